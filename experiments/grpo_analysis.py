"""The GRPO analysis table: the pipeline of configs/grpo/analysis.py (an SFT policy, then one online
GRPO stage per row, each changing one thing from `grpo_all`), then its table.

Per row, over training seeds: held-out accuracy per trained level (sampled; mean ± std over training
seeds, or over sampling seeds with one training seed), greedy accuracy, mean completion length at
evaluation, the multi-run fraction of problems solved in some but not all sampling runs, and from
the training logs the mean fraction of zero-advantage groups, of injected samples and the last
logged completion length; then the paired accuracy difference of every row to `grpo_all` on the
same training seed. Writes results.json, results.md and loss_curves.png.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from kuaijax import plotting
from kuaijax.results import write_results
from kuaijax.stages import report, run_pipeline
from kuaijax.train.metrics import read_metrics

REFERENCE = 'grpo_all'
TRAINING_KEYS = ('zero_advantage_fraction', 'injected', 'completion_length')


def training_summary(infos: list[dict]) -> dict:
  """Mean over training seeds of each stage's per-step training logs: the zero-advantage group
  fraction and injected fraction averaged over steps, and the completion length at the last step."""
  per_seed = []
  for info in infos:
    records = [r for r in read_metrics(info['dir']) if 'zero_advantage_fraction' in r]
    if not records:
      return {}
    per_seed.append(
      {
        'zero_advantage_fraction': np.mean([r['zero_advantage_fraction'] for r in records]),
        'injected': np.mean([r['injected'] for r in records]),
        'completion_length': records[-1]['completion_length'],
      }
    )
  return {key: report.mean_std([s[key] for s in per_seed]) for key in TRAINING_KEYS}


def _number(evals: list[dict], key: str, scale: float = 1.0) -> str:
  """Mean ± std over training seeds of `key` (the value alone for one seed)."""
  if not evals or any(key not in e for e in evals):
    return '-'
  mean, std = report.mean_std([scale * e[key] for e in evals])
  return f'{mean:.1f}' + (f' ± {std:.1f}' if len(evals) > 1 else '')


def _logged(train: dict, key: str, seeds: int, scale: float = 100.0) -> str:
  """A `training_summary` value (mean ± std over training seeds), scaled; '-' when not logged."""
  if key not in train:
    return '-'
  mean, std = train[key]
  return f'{scale * mean:.1f}' + (f' ± {scale * std:.1f}' if seeds > 1 else '')


def results_table(runs: dict, config) -> str:
  ev = config.evals.arith
  groups = list(ev.groups)
  spread = (
    report.spread_note(runs)
    if len(runs) > 1
    else f'1 training seed; accuracies ± std over {len(ev.seeds)} sampling seeds'
  )
  lines = [
    f'## kj_arith held-out accuracy (%) and GRPO statistics; {ev.per_group} problems per level, '
    f'sampled at T={ev.temperature} over {len(ev.seeds)} sampling runs; {spread}',
    '',
    '| policy | '
    + ' | '.join(f'level {k}' for k in groups)
    + ' | all | greedy | length (eval) | uncertain % | zero-adv. groups % | injected % '
    '| length (train, last) |',
    '|---|' + '---:|' * (len(groups) + 7),
  ]
  first = runs[next(iter(runs))]
  for name, info in first.items():
    if 'eval' not in info:
      continue
    infos = [stages[name] for stages in runs.values()]
    evals = [i['eval'] for i in infos]
    train = training_summary(infos) if info['type'] == 'train' else {}
    cells = [report.accuracy_cell(evals, f'accuracy/level_{k}') for k in groups]
    cells += [
      report.accuracy_cell(evals, 'accuracy'),
      report.accuracy_cell(evals, 'greedy/accuracy', sampled=False),
      _number(evals, 'completion_length'),
      _number(evals, 'runs/uncertain', scale=100.0),
      _logged(train, 'zero_advantage_fraction', len(infos)),
      _logged(train, 'injected', len(infos)),
      _logged(train, 'completion_length', len(infos), scale=1.0),
    ]
    lines.append(f'| {info["block"].get("label", name)} | ' + ' | '.join(cells) + ' |')
  names = [n for n, i in first.items() if i['type'] == 'train' and 'eval' in i and n != 'sft']
  if REFERENCE in names:
    rows = report.paired_differences(runs, names, REFERENCE, 'accuracy')
    for r in rows:
      r.update(mean=100 * r['mean'], std=100 * r['std'])
    lines += ['', report.differences_table(rows, REFERENCE, 'accuracy (points)')]
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> dict:
  runs = run_pipeline(config, workdir)
  first = runs[config.seeds[0]]
  training = {
    name: training_summary([stages[name] for stages in runs.values()])
    for name, info in first.items()
    if info['type'] == 'train'
  }
  results = {
    'runs': report.without_blocks(runs),
    'training': training,
    'seeds': report.seeds_record(config),
  }
  table = results_table(runs, config)
  if jax.process_index() == 0:
    plots = plotting.write_loss_curves(workdir, report.trained_stage_dirs(runs, workdir))
    results['plots'] = [os.path.basename(p) for p in plots]
  write_results(workdir, results, table)
  print(table)
  return results
