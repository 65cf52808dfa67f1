"""Parrot / CaPO on kj_dialog: the stage pipeline of `configs/capo/parrot.py` once per seed, then the
tables (kj_dialog-8 accuracy per turn and on context-dependent turns, context sensitivity; on
held-out CaPO pairs, preference and implicit-reward accuracy per negative kind; mean ± std over
seeds), the accuracy-by-turn plot and the loss curves.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from kuaijax import plotting
from kuaijax.results import write_results
from kuaijax.stages import report, run_pipeline

_ASK_STATS = (
  'well_formed',
  'context_dependent',
  'turns_per_session',
  'context_dependent_per_session',
)


def policy_rows(runs: dict) -> dict[str, dict]:
  """label -> {metric: [value per training seed]} for every evaluated chat policy (not the ask
  model)."""
  rows: dict[str, dict] = {}
  for stages in runs.values():
    for info in stages.values():
      block = info.get('block', {})
      if not info.get('eval') or block.get('options', {}).get('loss_on') == 'user':
        continue
      row = rows.setdefault(block['label'], {})
      for key, value in info['eval'].items():
        row.setdefault(key, []).append(float(value))
  return rows


def _cell(values, scale=100.0, digits=1) -> str:
  if not values:
    return '-'
  v = np.asarray(values, np.float64) * scale
  std = v.std(ddof=1) if len(v) > 1 else 0.0
  return f'{v.mean():.{digits}f} ± {std:.{digits}f}'


def pairs_table(runs: dict, config) -> list[str]:
  """Markdown lines: per policy and negative kind (and all kinds), the preference accuracy and the
  implicit-reward accuracy (%) on the held-out pairs of `kj_dialog_pairs`; [] without that
  evaluation."""
  ev = config.evals.get('kj_dialog_pairs')
  rows = policy_rows(runs)
  if ev is None or not any('pairs/all/count' in row for row in rows.values()):
    return []
  kinds = (*ev.kinds, 'all')
  counts = next(row for row in rows.values() if 'pairs/all/count' in row)
  sizes = ', '.join(f'{k} {int(counts[f"pairs/{k}/count"][0])}' for k in kinds)
  ref = ev.reference
  ref_label = config.stage[ref].get('label', ref) if ref in config.stage else ref
  lines = [
    f'## Held-out CaPO pairs ({ev.split} split, {ev.sessions} sessions; pairs: {sizes}): '
    f'preference / implicit-reward accuracy (%), {report.spread_note(runs)}',
    '',
    'pref. = log pi(chosen) > log pi(rejected), the summed log-probs of the final answer as the '
    f'CaPO loss scores them; reward = beta (log pi - log ref)(chosen) > the same for rejected, '
    f'beta {ev.beta}, ref = {ref_label} ({ref_label} itself: 0 by definition; - = no reference '
    'available when the policy was evaluated).',
    '',
    '| policy | ' + ' | '.join(f'{k} pref. | {k} reward' for k in kinds) + ' |',
    '|---|' + '---:|' * (2 * len(kinds)),
  ]
  for label, row in rows.items():
    cells = []
    for k in kinds:
      cells += [_cell(row.get(f'pairs/{k}/preference_accuracy'))]
      cells += [_cell(row.get(f'pairs/{k}/reward_accuracy'))]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return ['', *lines]


def results_table(runs: dict, config) -> str:
  """Markdown: per policy, accuracy (%) per turn, on context-dependent / self-contained turns, and
  the context-sensitivity measure (nats), mean ± std over seeds; then `pairs_table` and the
  Parrot-Ask statistics."""
  ev = config.evals.kj_dialog8
  turns = range(1, ev.num_turns + 1)
  lines = [
    f'## kj_dialog-8 ({ev.split} split, {ev.sessions} sessions, {ev.history} history): exact-match '
    f'accuracy (%), {report.spread_note(runs)}',
    '',
    '| policy | ' + ' | '.join(f'turn {k}' for k in turns) + ' | all | context-dep. | '
    'self-contained | context sensitivity (nats) |',
    '|---|' + '---:|' * (len(turns) + 4),
  ]
  for label, row in policy_rows(runs).items():
    cells = [_cell(row.get(f'accuracy/turn_{k}')) for k in turns]
    cells += [_cell(row.get(k)) for k in ('accuracy', 'accuracy/context_dependent')]
    cells += [_cell(row.get('accuracy/self_contained'))]
    cells += [_cell(row.get('context_sensitivity'), scale=1.0, digits=2)]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  lines += pairs_table(runs, config)
  ask = [s['sessions']['summary'] for s in runs.values() if 'sessions' in s]
  if ask:
    lines += [
      '',
      '## Parrot-Ask sessions (queries written by the ask model, answered by the program)',
      '',
      '| well-formed (%) | context-dependent (% of well-formed) | turns / session | '
      'context-dependent turns / session |',
      '|---:|---:|---:|---:|',
      '| '
      + ' | '.join(
        _cell([a[k] for a in ask], scale=100.0 if k in _ASK_STATS[:2] else 1.0, digits=1)
        for k in _ASK_STATS
      )
      + ' |',
    ]
  lines += ['', '| seed | stage | type | steps | wall time (s) |', '|---|---|---|---:|---:|']
  for seed, stages in runs.items():
    for name, info in stages.items():
      steps = info['summary'].get('steps', '')
      lines.append(f'| {seed} | {name} | {info["type"]} | {steps} | {info["wall_s"]:.0f} |')
  return '\n'.join(lines) + '\n'


def plot_accuracy_by_turn(runs: dict, config, workdir: str) -> str:
  """accuracy_by_turn.png: mean accuracy per turn (error bars: std over seeds) per policy."""
  turns = np.arange(1, config.evals.kj_dialog8.num_turns + 1)
  fig = Figure(figsize=(6.4, 4))
  ax = fig.subplots()
  for label, row in policy_rows(runs).items():
    values = np.array([row.get(f'accuracy/turn_{k}', [np.nan]) for k in turns]) * 100
    std = values.std(axis=1, ddof=1) if values.shape[1] > 1 else np.zeros(len(turns))
    ax.errorbar(turns, values.mean(axis=1), yerr=std, marker='o', capsize=3, label=label)
  ax.set(xlabel='turn', ylabel='exact match (%)', title='kj_dialog-8, own history')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  path = os.path.join(workdir, 'accuracy_by_turn.png')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return path


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  runs = run_pipeline(config, workdir)
  results = {
    'runs': report.without_blocks(runs),
    'rows': policy_rows(runs),
    'seeds': report.seeds_record(config),
    'wall_s': time.time() - start,
  }
  table = results_table(runs, config)
  if jax.process_index() == 0:
    plots = [plot_accuracy_by_turn(runs, config, workdir)]
    plots += plotting.write_loss_curves(workdir, report.trained_stage_dirs(runs, workdir))
    results['plots'] = [os.path.basename(p) for p in plots if p]
  write_results(workdir, results, table)
  print(table)
  return results
