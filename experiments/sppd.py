"""SPPD on kj_arith end to end, beside SFT / DPO / step-DPO, over several training seeds.

The stages of `configs/sppd/arith.py` run through `kuaijax.stages.run_pipeline` once per training
seed (the SFT policy once, in `<workdir>/shared/`); re-running the command resumes. This file only
builds results.md / results.json from the stage folders: the post-training table
(`kuaijax.stages.posttrain_table`: accuracy per level, greedy, length, paired differences to
`config.reference_row`), then the step values' accuracy against the program check (MC and PRM), the
step pairs, the PRM's best-of-n reranking, and sppd.png (accuracy per row; value accuracies).
"""

from __future__ import annotations

import os
import time

import jax
from matplotlib.figure import Figure

from kuaijax import plotting
from kuaijax.results import write_results
from kuaijax.stages import posttrain_table, report, run_pipeline
from kuaijax.stages import sppd as sppd_stages
from kuaijax.stages.base import data_of

# (key, row label) of the value accuracy table
VALUE_ROWS = (
  ('mc_vs_truth', 'MC value vs program check'),
  ('prm_vs_truth', 'PRM vs program check'),
  ('always_bad', 'always "bad step" vs program check (baseline)'),
  ('prm_vs_mc', 'PRM vs MC value'),
  ('prm_sibling_order', 'PRM ranks MC-valued sibling pairs (gap > 0.5) as MC does'),
)
PAIR_STAGES = ('step_pairs_mc', 'step_pairs_prm', 'pairs')
RERANK_KEYS = (
  ('sample_accuracy', 'one sample'),
  ('best_of_n_accuracy', 'best of n by the PRM'),
  ('oracle_accuracy', 'any of n correct (oracle)'),
)


def over_seeds(runs: dict, stage: str, key: str) -> list[float] | None:
  """[mean, std] over training seeds of a stage summary's value; None when a seed lacks it."""
  values = [s[stage]['summary'].get(key) for s in runs.values() if stage in s]
  if len(values) < len(runs) or any(v is None for v in values):
    return None
  return report.mean_std(values)


def _cell(pair, scale=100.0, spec='.1f') -> str:
  return '-' if pair is None else f'{scale * pair[0]:{spec}} ± {scale * pair[1]:{spec}}'


def value_accuracy(stages: dict) -> dict:
  """One seed's step-value accuracies (`kuaijax.stages.sppd.value_accuracies` of the tree and PRM
  stages), the majority baseline, and how often the PRM orders sibling steps as the MC values do."""
  tree = stages['tree']['summary']
  out = {'mc_vs_truth': tree['mc_vs_truth'], 'always_bad': 1.0 - tree['truth_good_fraction']}
  if 'prm_values' in stages:
    out.update({k: stages['prm_values']['summary'][k] for k in ('prm_vs_truth', 'prm_vs_mc')})
    out['prm_sibling_order'] = sppd_stages.sibling_order(
      data_of(stages['prm_values']), reference='mc_value', value='prm_value', min_gap=0.5
    )
  return out


def sppd_summary(runs: dict) -> dict:
  """The value accuracies, pair statistics and reranking accuracies, [mean, std] over seeds."""
  keys = ('pairs', 'mean_gap', 'true_order', 'inverted')
  per_seed = [value_accuracy(stages) for stages in runs.values() if 'tree' in stages]
  shared = set.intersection(*(set(v) for v in per_seed)) if per_seed else set()
  return {
    'value_accuracy_per_seed': dict(zip(map(str, runs), per_seed)),
    'value_accuracy': {k: report.mean_std([v[k] for v in per_seed]) for k in sorted(shared)},
    'steps_judged': over_seeds(runs, 'tree', 'steps'),
    'pairs': {
      stage: {key: over_seeds(runs, stage, key) for key in keys if over_seeds(runs, stage, key)}
      for stage in PAIR_STAGES
    },
    'rerank': {key: over_seeds(runs, 'prm_rerank', key) for key, _ in RERANK_KEYS},
  }


def sppd_tables(summary: dict, runs: dict) -> str:
  """Markdown: value accuracy, step pairs and best-of-n tables (± over training seeds)."""
  n = len(runs)
  steps = summary['steps_judged']
  lines = [
    f'## Step values on the held-out trees (mean ± std over {n} training seeds; '
    f'{steps[0]:.0f} steps per seed)'
    if steps
    else '## Step values',
    '',
    'A value > 0.5 counts as "good step"; the program check passes a step when every step up to it '
    'is right. The PRM never saw these problems. The last row is chance at 50%: it asks whether the '
    'PRM tells sibling steps apart rather than easy problems from hard ones.',
    '',
    '| comparison | accuracy (%) |',
    '|---|---:|',
  ]
  for key, label in VALUE_ROWS:
    lines.append(f'| {label} | {_cell(summary["value_accuracy"].get(key))} |')
  lines += [
    '',
    '## Pairs (per seed)',
    '',
    'step pairs: siblings whose values differ by > 0.5; true order: the chosen step passes the '
    'program check and the rejected one does not; inverted: the converse. pairs: sequence-level '
    '(correct, wrong) solutions of the same trees.',
    '',
    '| pairs stage | pairs | mean value gap | true order (%) | inverted (%) |',
    '|---|---:|---:|---:|---:|',
  ]
  for stage, stats in summary['pairs'].items():
    if not stats:
      continue
    cells = [
      _cell(stats.get('pairs'), 1, '.0f'),
      _cell(stats.get('mean_gap'), 1, '.2f'),
      _cell(stats.get('true_order')),
      _cell(stats.get('inverted')),
    ]
    lines.append(f'| {stage} | ' + ' | '.join(cells) + ' |')
  rerank = summary['rerank']
  if any(rerank.values()):
    first = next(iter(runs.values()))['prm_rerank']['summary']
    lines += [
      '',
      f'## Best-of-{first["num_samples"]} reranking by the PRM ({first["problems"]} test problems, '
      f'the SFT policy at T=0.7)',
      '',
      '| pick | accuracy (%) |',
      '|---|---:|',
    ]
    lines += [f'| {label} | {_cell(rerank[key])} |' for key, label in RERANK_KEYS]
  return '\n'.join(lines) + '\n'


def plot(workdir: str, runs: dict, summary: dict) -> str:
  """sppd.png: held-out accuracy per row (± over seeds), and the step-value accuracies."""
  first = next(iter(runs.values()))
  rows = [name for name, info in first.items() if info.get('eval')]
  accuracy = [
    report.mean_std([s[name]['eval']['accuracy'] for s in runs.values()]) for name in rows
  ]
  fig = Figure(figsize=(11, 3.8))
  left, right = fig.subplots(1, 2)
  left.barh(
    [first[n]['block']['label'] for n in rows],
    [100 * m for m, _ in accuracy],
    xerr=[100 * s for _, s in accuracy],
    color='tab:blue',
  )
  left.invert_yaxis()
  left.set(xlabel='held-out accuracy (%)', title=f'kj_arith, mean ± std over {len(runs)} seeds')
  values = {label: summary['value_accuracy'].get(key) for key, label in VALUE_ROWS}
  values = {k: v for k, v in values.items() if v}
  right.barh(
    list(values),
    [100 * m for m, _ in values.values()],
    xerr=[100 * s for _, s in values.values()],
    color='tab:green',
  )
  right.invert_yaxis()
  right.set(xlabel='step accuracy (%)', title='step values', xlim=(0, 100))
  fig.tight_layout()
  path = os.path.join(workdir, 'sppd.png')
  fig.savefig(path, dpi=110)
  return path


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  runs = run_pipeline(config, workdir)
  results, table = posttrain_table.summarise(runs, config)
  summary = sppd_summary(runs)
  results.update(summary, wall_s=time.time() - start)
  folders = {info['dir']: info['wall_s'] for stages in runs.values() for info in stages.values()}
  results['stage_wall_s'] = float(sum(folders.values()))  # a shared stage once
  table += '\n' + sppd_tables(summary, runs)
  if jax.process_index() == 0:
    plots = plotting.write_loss_curves(workdir, report.trained_stage_dirs(runs, workdir))
    plots.append(plot(workdir, runs, summary))
    results['plots'] = [os.path.relpath(p, workdir) for p in plots]
  write_results(workdir, results, table)
  print(table)
  return results
