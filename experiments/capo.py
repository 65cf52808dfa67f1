"""Parrot / CaPO on kj_dialog: the stage pipeline of `configs/capo/parrot.py` once per seed, then the
table (kj_dialog-8 accuracy per turn and on context-dependent turns, context sensitivity; mean ± std
over seeds), the accuracy-by-turn plot and the loss curves.
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


def results_table(runs: dict, config) -> str:
  """Markdown: per policy, accuracy (%) per turn, on context-dependent / self-contained turns, and
  the context-sensitivity measure (nats), mean ± std over seeds; then the Parrot-Ask statistics."""
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
