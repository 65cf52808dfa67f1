"""Self-Agreement vs Self-Consistency, USC and greedy CoT: the table and plots of the stage pipeline.

The stages of `configs/self_agreement/toy.py` run through `kuaijax.stages.run_pipeline` once per
training seed of `config.seeds` (the toy SFT data set, shared, then the SFT; or a 'params' stage of
an imported Hugging Face model); every stage that produces parameters is evaluated by the
'self_agreement' evaluator (`kuaijax.evals.self_agreement`: accuracy vs k for greedy, SC, USC and SA
over its sampling seeds, in the 'trigger' and 'mixed' scenarios). This file only reads every seed's
`stage.json['eval']` and writes results.json, results.md, accuracy_vs_k.png and loss_curves.png.
With one training seed a ± is the std over the sampling seeds; with several, the std over the
training seeds of each seed's mean over its sampling seeds.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from kuaijax import plotting
from kuaijax.evals import self_agreement as sa_eval
from kuaijax.inference.compare import METHODS
from kuaijax.results import write_results
from kuaijax.stages import report, run_pipeline

EVALUATOR = 'self_agreement'


def evaluator_block(config):
  """The config's 'self_agreement' evaluator block."""
  for name, block in config.evals.items():
    if block.get('type', name) == EVALUATOR:
      return block
  raise ValueError(f'config.evals has no {EVALUATOR!r} evaluator ({sorted(config.evals)})')


def _cell(evals: list[dict], prefix: str, scenario: str, k: int, method: str) -> dict:
  """One table cell (accuracy in %) from every training seed's eval of one stage."""
  if method == 'greedy':
    values = [100 * e[f'{prefix}/{scenario}/greedy/accuracy'] for e in evals]
    mean, std = report.mean_std(values)
    return {'accuracy': mean, 'accuracy/std': std}
  name = lambda e, stat: e[sa_eval.metric_name(prefix, scenario, k, method, stat)]
  fallbacks = {}
  for e in evals:
    for status, n in sa_eval.statuses(e, prefix, scenario, k, method).items():
      fallbacks[status] = fallbacks.get(status, 0) + n
  if len(evals) == 1:  # one training seed: the spread over the sampling seeds
    mean, std = 100 * name(evals[0], 'accuracy'), 100 * name(evals[0], 'accuracy/std')
  else:
    mean, std = report.mean_std([100 * name(e, 'accuracy') for e in evals])
  return {
    'accuracy': mean,
    'accuracy/std': std,
    'uncertain_fraction': float(np.mean([name(e, 'uncertain_fraction') for e in evals])),
    'accuracy_on_certain': float(np.nanmean([name(e, 'accuracy_on_certain') for e in evals])),
    'num_runs': int(name(evals[0], 'num_runs')),
    'fallbacks': fallbacks,
  }


def summarise(runs: dict, config) -> dict:
  """{stage: {'label', 'scenarios': {scenario: {'num_items', 'by_k': {k: {method: cell}}}}}} for
  every stage evaluated in every seed."""
  ev = evaluator_block(config)
  prefix = ev.get('prefix', 'sa')
  first = runs[next(iter(runs))]
  out = {}
  for name, info in first.items():
    if not info.get('eval'):
      continue
    evals = [stages[name]['eval'] for stages in runs.values()]
    scenarios = {}
    for scenario in ev.scenarios:
      by_k = {str(k): {m: _cell(evals, prefix, scenario, k, m) for m in METHODS} for k in ev.ks}
      num_items = int(evals[0][f'{prefix}/{scenario}/num_items'])
      scenarios[scenario] = {'num_items': num_items, 'by_k': by_k}
    out[name] = {'label': info['block'].get('label', name), 'scenarios': scenarios}
  return out


def spread_note(runs: dict, ev) -> str:
  sampling = f'{len(ev.seeds)} sampling seeds (T={ev.temperature}, top-k {ev.top_k or "off"})'
  if len(runs) > 1:
    return f'mean ± std over {len(runs)} training seeds of the mean over {sampling}'
  return f'1 training seed, mean ± std over {sampling}'


def results_table(results: dict, runs: dict, config) -> str:
  ev = evaluator_block(config)
  lines = [f'## Accuracy (%) vs k paths, {spread_note(runs, ev)}', '']
  for policy in results['policies'].values():
    for scenario, r in policy['scenarios'].items():
      lines += [
        f'### {policy["label"]}, scenario: {scenario} ({r["num_items"]} held-out questions)',
        '',
        '| method | ' + ' | '.join(f'k={k}' for k in ev.ks) + ' |',
        '|---|' + '---:|' * len(ev.ks),
      ]
      for method in METHODS:
        cells = [r['by_k'][str(k)][method] for k in ev.ks]
        lines.append(
          f'| {method} | '
          + ' | '.join(f'{c["accuracy"]:.1f} ± {c["accuracy/std"]:.1f}' for c in cells)
          + ' |'
        )
      kmax = str(max(ev.ks))
      lines += [
        '',
        f'k={kmax}: uncertain-problem fraction and counted statuses over all seeds:',
        '',
      ]
      for method in ('sc', 'usc', 'sa'):
        c = r['by_k'][kmax][method]
        lines.append(
          f'- {method}: uncertain {100 * c["uncertain_fraction"]:.0f}%, accuracy on certain '
          f'{100 * c["accuracy_on_certain"]:.1f}%, statuses {c["fallbacks"]}'
        )
      lines.append('')
  first = runs[next(iter(runs))]
  for name, info in first.items():
    s = info['summary']
    if info['type'] == 'params':
      lines.append(f'Model: {s["path"]}, evaluated as imported (no training).')
    elif info['type'] == 'train':
      lines.append(
        f'Training ({name}, seed {info["seed"]}): {s["steps"]} steps, {s["rows"]} packed rows, '
        f'{s["dropped_too_long"]} examples dropped as too long, {info["wall_s"]:.0f} s with the '
        'evaluation.'
      )
    else:
      lines.append(f'Stage {name} ({info["type"]}): {s}, {info["wall_s"]:.0f} s.')
  return '\n'.join(lines) + '\n'


def plot(results: dict, config, workdir: str) -> str:
  """accuracy_vs_k.png: one panel per scenario, one line per method (and policy)."""
  ks = list(evaluator_block(config).ks)
  policies = results['policies']
  scenarios = list(next(iter(policies.values()))['scenarios'])
  fig = Figure(figsize=(5 * len(scenarios), 4))
  for i, scenario in enumerate(scenarios):
    ax = fig.add_subplot(1, len(scenarios), i + 1)
    for policy in policies.values():
      r = policy['scenarios'][scenario]
      for method in METHODS:
        mean = np.array([r['by_k'][str(k)][method]['accuracy'] for k in ks])
        std = np.array([r['by_k'][str(k)][method]['accuracy/std'] for k in ks])
        label = method if len(policies) == 1 else f'{policy["label"]} {method}'
        ax.errorbar(ks, mean, yerr=std, label=label, capsize=3, marker='o')
    ax.set(xscale='log', xlabel='k paths', ylabel='accuracy (%)', title=scenario)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'accuracy_vs_k.png'), dpi=80)
  return 'accuracy_vs_k.png'


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  runs = run_pipeline(config, workdir)
  results = {
    'policies': summarise(runs, config),
    'seeds': report.seeds_record(config),
    'runs': report.without_blocks(runs),
    'order': list(runs[config.seeds[0]]),
  }
  if not results['policies']:
    raise ValueError(f'no stage of {config.stages!r} was evaluated (evaluate=False everywhere?)')
  if jax.process_index() == 0:
    results['plots'] = [plot(results, config, workdir)]
    curves = plotting.write_loss_curves(workdir, report.trained_stage_dirs(runs, workdir))
    results['plots'] += [os.path.basename(p) for p in curves]  # none for an imported model
  results['wall_s'] = time.time() - start
  table = results_table(results, runs, config)
  write_results(workdir, results, table)
  print(table)
  return results
