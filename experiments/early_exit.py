"""Early exit without extra heads on a small kj_arith model: the table and plots of the stage pipeline.

The stages of `configs/early_exit/arith.py` (an SFT of a small byte-level model on kj_arith gold
solutions) run through `kuaijax.stages.run_pipeline` once per training seed of `config.seeds`; the
trained model is evaluated by the 'early_exit' evaluator (`kuaijax.evals.early_exit`):
- per layer (final norm + shared head on its residual state): agreement of its argmax with the last
  layer's, top-1 accuracy and loss on the gold solution tokens (teacher forced);
- per exit setting (confidence thresholds, consecutive-layer agreement, a learned gate fitted on
  frozen features of TRAINING solutions): greedy early-exit decoding accuracy, average layers used,
  tokens/s against normal full-depth decoding measured side by side (batch 1 and one batch of
  all problems; `kuaijax.benchmarking`: the speed-up is the median (min-max) of per-round ratios
  over `timing_rounds` interleaved rounds), and the teacher-forced perplexity of the exit
  distribution.
This file reads every seed's `stage.json['eval']` and writes results.json, results.md, layers.png,
tradeoff.png and loss_curves.png. Everything is deterministic given the trained model (greedy
decoding) except the timings; with several training seeds every number is the mean ± std over them.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from kuaijax import benchmarking, plotting
from kuaijax.evals.early_exit import PREFIX, ROW_KEYS
from kuaijax.results import write_results
from kuaijax.stages import report, run_pipeline

LAYER_KEYS = ('agreement', 'accuracy', 'loss', 'confidence')
SPEED_KEYS = ('early_exit_s', 'normal_s', 'speedup', 'speedup_min', 'speedup_max')


def summarise(evals: list[dict]) -> dict:
  """Per-layer read-outs and per-setting rows, each value [mean, std] over the training seeds."""
  e0 = evals[0]
  layers = {
    key: [
      report.mean_std([e[f'{PREFIX}/layers/{key}'][i] for e in evals])
      for i in range(len(e0[f'{PREFIX}/layers/{key}']))
    ]
    for key in LAYER_KEYS
  }
  rows = []
  for label in e0[f'{PREFIX}/settings']:
    row = {'setting': label}
    row.update({k: report.mean_std([e[f'{PREFIX}/{label}/{k}'] for e in evals]) for k in ROW_KEYS})
    for batch in ('batch1', 'batch'):
      row[batch] = {
        k: report.mean_std([e[f'{PREFIX}/{label}/{batch}/{k}'] for e in evals]) for k in SPEED_KEYS
      }
    rows.append(row)
  return {
    'num_layers': int(e0[f'{PREFIX}/num_layers']),
    'tokens': int(e0[f'{PREFIX}/tokens']),
    'num_test_problems': int(e0[f'{PREFIX}/num_test_problems']),
    'layers': layers,
    'settings': rows,
  }


def _v(pair, fmt: str, scale: float = 1.0, n: int = 1) -> str:
  """'mean' for one training seed, 'mean ± std' for several."""
  mean, std = pair
  return format(scale * mean, fmt) + (f' ± {format(scale * std, fmt)}' if n > 1 else '')


def _speedup(speed: dict, n: int) -> str:
  """'1.23x (1.10-1.31)' (median of the per-round ratios, min-max) for one training seed; the
  seeds' mean ± std of the medians for several."""
  if n > 1:
    return f'{_v(speed["speedup"], ".2f", n=n)}x'
  low, high = speed['speedup_min'][0], speed['speedup_max'][0]
  return f'{speed["speedup"][0]:.2f}x ({low:.2f}-{high:.2f})'


def cost_breakdown(summary: dict, n: int) -> str:
  """Markdown: each setting's speed-up split into the cost of decoding layer by layer (the 'full'
  setting never exits, so its speed-up is that overhead alone) and the layers it saves (speed-up /
  'full''s speed-up, each against normal decoding in its own interleaved rounds), next to the
  ideal saving num_layers / average layers used. On means over training seeds when n > 1."""
  rows = {r['setting']: r for r in summary['settings']}
  if 'full' not in rows:
    return ''
  L = summary['num_layers']
  lines = [
    '## Where the speed goes: speed-up = (layer-by-layer decoding vs normal) x (layers saved)',
    '',
    "The 'full' setting runs the early-exit decoder without ever exiting: its speed-up is the "
    'overhead of deciding per layer (read-out, rule, per-layer cache updates) alone.'
    + (f' Means over {n} training seeds.' if n > 1 else ''),
    '',
    '| setting | batch | speed-up | layer-by-layer vs normal | layers saved (measured) '
    '| layers saved (ideal: layers / avg layers) |',
    '|---|---|---:|---:|---:|---:|',
  ]
  for label, r in rows.items():
    for batch in ('batch1', 'batch'):
      speedup, overhead = r[batch]['speedup'][0], rows['full'][batch]['speedup'][0]
      ideal = L / r['avg_layers_decode'][0]
      lines.append(
        f'| {label} | {batch} | {speedup:.2f}x | {overhead:.2f}x | {speedup / overhead:.2f}x '
        f'| {ideal:.2f}x |'
      )
  return '\n'.join(lines) + '\n'


def results_table(results: dict, config, n: int) -> str:
  s, L = results['summary'], results['summary']['num_layers']
  ev = next(iter(config.evals.values()))
  over = f'mean ± std over {n} training seeds' if n > 1 else '1 training seed'
  lines = [
    f'## Per-layer read-out through the final norm + shared head ({s["tokens"]} held-out solution '
    f'tokens, teacher forced; {over})',
    '',
    '| layer | agreement with last layer | top-1 accuracy | loss | mean max prob |',
    '|---:|---:|---:|---:|---:|',
  ]
  a = s['layers']
  for i in range(L):
    lines.append(
      f'| {i + 1} | {_v(a["agreement"][i], ".1f", 100, n)}% | {_v(a["accuracy"][i], ".1f", 100, n)}% '
      f'| {_v(a["loss"][i], ".3f", n=n)} | {_v(a["confidence"][i], ".3f", n=n)} |'
    )
  lines += [
    '',
    f'## Early-exit decoding, {s["num_test_problems"]} held-out problems (greedy; {over}; '
    'speed-up = normal full-depth decoding time / early-exit time, the median of per-round ratios '
    f'over {ev.timing_rounds} interleaved rounds'
    + (', min-max in brackets)' if n == 1 else ', per seed)'),
    '',
    '| setting | avg layers (decode) | accuracy | perplexity (TF) | avg layers (TF) | speed-up batch 1 '
    '| speed-up batch | tokens/s (batch) | normal tokens/s |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in s['settings']:
    lines.append(
      f'| {r["setting"]} | {_v(r["avg_layers_decode"], ".2f", n=n)} / {L} | '
      f'{_v(r["accuracy"], ".1f", 100, n)}% | {_v(r["perplexity"], ".3f", n=n)} | '
      f'{_v(r["avg_layers_teacher_forced"], ".2f", n=n)} | '
      f'{_speedup(r["batch1"], n)} | {_speedup(r["batch"], n)} | '
      f'{_v(r["tokens_per_s_batch"], ".0f", n=n)} | {_v(r["tokens_per_s_normal_batch"], ".0f", n=n)} |'
    )
  lines += ['', cost_breakdown(s, n)]
  train = results['train']
  if train['type'] == 'train':
    model = (
      f'Training: {train["steps"]} steps, {train["wall_s"]:.0f} s with the evaluation (seed '
      f'{train["seed"]})'
    )
  else:
    model = f'Model: stage {results["stage"]} ({train["type"]}), {train["wall_s"]:.0f} s'
  lines += [
    '',
    benchmarking.header('Speed-up timing', rounds=ev.timing_rounds, warmup=1).rstrip(),
    '',
    'TF = teacher forced on the gold solutions (every layer sees full-depth context there; the '
    f'decoding columns use the propagated exit states). {model}; total {results["wall_s"]:.0f} s.',
  ]
  return '\n'.join(lines) + '\n'


def plot(results: dict, workdir: str) -> list[str]:
  s = results['summary']
  a, L = s['layers'], s['num_layers']
  layers = np.arange(1, L + 1)
  mean = lambda key, scale=1.0: scale * np.array([v[0] for v in a[key]])
  std = lambda key, scale=1.0: scale * np.array([v[1] for v in a[key]])
  fig = Figure(figsize=(9, 3.5))
  ax = fig.add_subplot(1, 2, 1)
  for key, label in (('agreement', 'agreement with last layer'), ('accuracy', 'top-1 accuracy')):
    ax.errorbar(layers, mean(key, 100), yerr=std(key, 100), marker='o', label=label, capsize=3)
  ax.set(xlabel='layer', ylabel='%', title='per-layer read-out')
  ax.legend()
  ax = fig.add_subplot(1, 2, 2)
  ax.errorbar(layers, mean('loss'), yerr=std('loss'), marker='o', capsize=3)
  ax.set(xlabel='layer', ylabel='loss (nats)', title='per-layer loss')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'layers.png'), dpi=80)
  fig = Figure(figsize=(9, 3.5))
  rows = s['settings']
  for j, (key, label) in enumerate((('accuracy', 'accuracy'), ('perplexity', 'perplexity (TF)'))):
    ax = fig.add_subplot(1, 2, j + 1)
    x = [r['batch1']['speedup'][0] for r in rows]
    y = [(100 if key == 'accuracy' else 1) * r[key][0] for r in rows]
    ax.plot(x, y, 'o')
    for r, xi, yi in zip(rows, x, y):
      ax.annotate(r['setting'], (xi, yi), fontsize=7)
    ax.set(xlabel='speed-up vs full decoding (batch 1)', ylabel=label)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'tradeoff.png'), dpi=80)
  return ['layers.png', 'tradeoff.png']


def evaluated_stage(runs: dict) -> str:
  """The (first) stage that carries an early-exit evaluation in every seed."""
  first = runs[next(iter(runs))]
  for name, info in first.items():
    if f'{PREFIX}/settings' in (info.get('eval') or {}):
      return name
  raise ValueError('no stage was evaluated by the early_exit evaluator')


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  runs = run_pipeline(config, workdir)
  name = evaluated_stage(runs)
  evals = [stages[name]['eval'] for stages in runs.values()]
  first = runs[next(iter(runs))][name]
  results = {
    'stage': name,
    'summary': summarise(evals),
    'seeds': report.seeds_record(config),
    'runs': report.without_blocks(runs),
    'train': {
      'type': first['type'],
      'steps': first['summary'].get('steps', 0),
      'wall_s': first['wall_s'],
      'seed': first['seed'],
    },
  }
  if jax.process_index() == 0:
    results['plots'] = plot(results, workdir)
    curves = plotting.write_loss_curves(workdir, report.trained_stage_dirs(runs, workdir))
    results['plots'] += [os.path.basename(p) for p in curves]
  results['wall_s'] = time.time() - start
  table = results_table(results, config, len(runs))
  write_results(workdir, results, table)
  print(table)
  return results
