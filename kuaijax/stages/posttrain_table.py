"""The post-training accuracy table of a pipeline run on kj_arith-like tasks (`task_accuracy`
evaluations) over training seeds: accuracy per level, greedy accuracy, mean completion length at
evaluation, the multi-run fractions of problems solved in some but not all sampling runs
("uncertain") and in at least one ("solved in any run": pass@n over the n sampling runs); for online
GRPO stages the training statistics from their logs (zero-advantage groups, injected samples,
completion length); with `config.reference_row` every row's accuracy minus that row's on the same
training seed; then each stage's steps, wall time and data summary. Used by the post-training
experiments (experiments/arith_posttrain.py, experiments/rlmec.py).
"""

from __future__ import annotations

import json

import numpy as np

from kuaijax.losses import rl
from kuaijax.stages import report
from kuaijax.train.metrics import read_metrics


def _label(block: dict) -> str:
  """A stage's row name; a GRPO stage names its loss type and advantage scaling."""
  if block.get('method') != 'grpo':
    return block['label']
  loss_type = block.get('loss', {}).get('loss_type', 'grpo')
  scale = rl.resolve_advantage_scale(
    block.get('options', {}).get('advantage_scale', 'auto'), loss_type
  )
  return f'{block["label"]} ({loss_type}, {scale})'


def grpo_training(infos: list[dict]) -> dict:
  """{key: [mean, std] over training seeds} of an online GRPO stage's logs (one info per seed): the
  zero-advantage group and injected fractions averaged over steps, the completion length at the
  last step; empty for other stages."""
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
  return {key: report.mean_std([s[key] for s in per_seed]) for key in per_seed[0]}


def _pm(mean: float, std: float, seeds: int) -> str:
  """'mean ± std' over training seeds (the mean alone for one seed), one decimal."""
  return f'{mean:.1f}' + (f' ± {std:.1f}' if seeds > 1 else '')


def _mean_cell(values: list[float]) -> str:
  """Mean ± std over training seeds of one value per seed."""
  return _pm(*report.mean_std(values), len(values))


def grpo_table(training: dict, labels: dict, seeds: int) -> str:
  """Markdown: the GRPO stages' training statistics (`grpo_training`, ± over `seeds` training
  seeds when there are several), or '' when there are none."""
  rows = {name: stats for name, stats in training.items() if stats}
  if not rows:
    return ''
  lines = [
    'Online GRPO during training (per step, averaged over steps):',
    '',
    '| policy | zero-advantage groups % | injected samples % | completion length (last step) |',
    '|---|---:|---:|---:|',
  ]
  scales = dict(zero_advantage_fraction=100, injected=100, completion_length=1)
  for name, stats in rows.items():
    cells = [_pm(s * stats[k][0], s * stats[k][1], seeds) for k, s in scales.items()]
    lines.append(f'| {labels[name]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def results_table(runs: dict, config, training: dict | None = None) -> str:
  """Markdown: sampled accuracy (%) by level per policy, greedy, completion length, solved-in-any-run
  and uncertain fractions at evaluation; the GRPO training statistics; the paired differences to
  `config.reference_row`; then each stage's steps, wall time and data summary (first seed)."""
  ev = next(iter(config.evals.values()))
  groups = list(ev.groups)
  spread = (
    report.spread_note(runs)
    if len(runs) > 1
    else f'1 training seed, mean ± std over {len(ev.seeds)} sampling seeds'
  )
  lines = [
    f'## kj_arith held-out accuracy (%), {ev.split} split, {ev.per_group} problems per level; '
    f'sampled at T={ev.temperature}: {spread}',
    '',
    '| policy | '
    + ' | '.join(f'level {k}' for k in groups)
    + ' | all | greedy all | length (eval) | solved in any run % | uncertain % |',
    '|---|' + '---:|' * (len(groups) + 5),
  ]
  first = runs[next(iter(runs))]
  # the policies evaluated (a stage trained with evaluate=False, e.g. a reward model, has none)
  labels = {name: _label(info['block']) for name, info in first.items() if info.get('eval')}
  shared = False
  for name in labels:
    infos = [stages[name] for stages in runs.values()]
    if len(runs) > 1 and len({i['dir'] for i in infos}) == 1:  # one run shared by every seed
      infos, shared = infos[:1], True
      labels[name] += ' †'
    evals = [i['eval'] for i in infos]
    cells = [report.accuracy_cell(evals, f'accuracy/level_{k}') for k in groups] + [
      report.accuracy_cell(evals, 'accuracy'),
      report.accuracy_cell(evals, 'greedy/accuracy', sampled=False),
    ]
    for key, scale in (('completion_length', 1), ('runs/solved_any', 100), ('runs/uncertain', 100)):
      present = all(key in e for e in evals)
      cells.append(_mean_cell([scale * e[key] for e in evals]) if present else '-')
    lines.append(f'| {labels[name]} | ' + ' | '.join(cells) + ' |')
  if shared:
    lines += ['', '† trained once and shared by every training seed: ± over its sampling seeds.']
  grpo = grpo_table({n: t for n, t in (training or {}).items() if n in labels}, labels, len(runs))
  lines += ['', grpo] if grpo else []
  reference = config.get('reference_row', '')
  evaluated = [n for n in labels if n != 'sft']
  if reference in evaluated and len(evaluated) > 1:
    rows = report.paired_differences(runs, evaluated, reference, 'accuracy')
    for r in rows:
      r.update(mean=100 * r['mean'], std=100 * r['std'])
    lines += ['', report.differences_table(rows, reference, 'accuracy (points)')]
  lines += ['', '| stage | type | steps | wall time (s) | data |', '|---|---|---:|---:|---|']
  for name, info in first.items():
    summary = {k: v for k, v in info['summary'].items() if k not in ('steps', 'last_train_metrics')}
    steps = info['summary'].get('steps', '')
    data = json.dumps(summary, sort_keys=True)
    lines.append(f'| {name} | {info["type"]} | {steps} | {info["wall_s"]:.0f} | {data} |')
  return '\n'.join(lines) + '\n'


def summarise(runs: dict, config) -> tuple[dict, str]:
  """(results, markdown table) of a finished pipeline's `runs` ({seed: {stage: info}})."""
  first = runs[config.seeds[0]]
  training = {
    name: grpo_training([stages[name] for stages in runs.values()])
    for name, info in first.items()
    if info['type'] == 'train'
  }
  results = {
    'runs': report.without_blocks(runs),
    'order': list(first),
    'grpo_training': {name: stats for name, stats in training.items() if stats},
    'seeds': report.seeds_record(config),
  }
  return results, results_table(runs, config, training)
