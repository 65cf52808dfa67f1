"""PNG plots every experiment writes into its workdir (process 0 only).

`write_loss_curves` reads the metrics.jsonl of one or more training runs (the trainer's log: one
record per logged step with 'loss', one per evaluation with 'eval/...' keys) and draws the training
loss and, when the runs were evaluated, the validation loss. `write_bar_chart` is for experiments
that measure instead of train (benchmarks). matplotlib's Figure is used directly (no pyplot), so no
GUI backend is needed or changed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
from matplotlib.figure import Figure

from kuaijax.train.metrics import read_metrics

LOSS_CURVES = 'loss_curves.png'


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  points = [(r['step'], r[key]) for r in records if isinstance(r.get(key), int | float)]
  return [s for s, _ in points], [v for _, v in points]


def write_loss_curves(
  workdir: str,
  runs: Sequence[str] = ('',),
  *,
  baselines: Mapping[str, float] | None = None,
  filename: str = LOSS_CURVES,
) -> list[str]:
  """Writes `workdir/filename`; returns its path in a list (empty when there is nothing to draw).

  `runs` are the training runs' folders relative to `workdir` ('' = the workdir itself), one line
  each. Left: training loss per logged step. Right (when evaluated): validation loss ('eval/loss')
  per run or, for a single run with per-task losses, one line per task ('eval/loss/<task>') and
  `baselines[f'loss/<task>']` (e.g. a unigram model) as a dashed line of the same colour.
  """
  if jax.process_index() != 0:
    return []
  logs = {}
  for run in runs:
    if os.path.exists(os.path.join(workdir, run, 'metrics.jsonl')):
      logs[run or 'train'] = read_metrics(os.path.join(workdir, run))
  train = {name: _series(records, 'loss') for name, records in logs.items()}
  train = {name: s for name, s in train.items() if s[0]}
  if len(logs) == 1:
    (records,) = logs.values()
    keys = sorted(k for k in {k for r in records for k in r} if k.startswith('eval/loss/'))
    val = {k.removeprefix('eval/loss/'): _series(records, k) for k in keys}
    val['all'] = _series(records, 'eval/loss')
  else:
    val = {name: _series(records, 'eval/loss') for name, records in logs.items()}
  val = {name: s for name, s in val.items() if s[0]}
  if not train and not val:
    return []
  # Baselines go with per-task lines, i.e. a single run.
  val_baselines = (baselines or {}) if len(logs) == 1 else {}
  val_title = 'validation loss' + (' (dashed: baseline)' if val_baselines else '')
  panels = [
    (t, s, b) for t, s, b in (('training loss', train, {}), (val_title, val, val_baselines)) if s
  ]
  fig = Figure(figsize=(6 * len(panels), 4))
  for ax, (title, series, base) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
    for name, (steps, values) in series.items():
      (line,) = ax.plot(steps, values, marker='.' if len(steps) < 30 else None, label=name)
      level = base.get('loss' if name == 'all' else f'loss/{name}')
      if level is not None:
        ax.axhline(level, color=line.get_color(), linestyle='--', alpha=0.6)
    ax.set(title=title, xlabel='step', ylabel='loss')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return [path]


def write_bar_chart(
  workdir: str,
  filename: str,
  groups: Mapping[str, Mapping[str, float]],
  *,
  title: str,
  xlabel: str,
) -> list[str]:
  """Horizontal bars, one row per label and one colour per group; writes `workdir/filename`."""
  if jax.process_index() != 0 or not groups:
    return []
  labels = list(dict.fromkeys(label for values in groups.values() for label in values))
  height = 0.8 / len(groups)
  fig = Figure(figsize=(8, 1 + 0.5 * len(labels) * max(1, len(groups) / 2)))
  ax = fig.subplots()
  for i, (group, values) in enumerate(groups.items()):
    rows = [j for j, label in enumerate(labels) if label in values]
    ax.barh(
      [j + (i - (len(groups) - 1) / 2) * height for j in rows],
      [values[labels[j]] for j in rows],
      height=height,
      label=group,
    )
  ax.set_yticks(range(len(labels)), labels)
  ax.invert_yaxis()
  ax.set(title=title, xlabel=xlabel)
  ax.grid(axis='x', alpha=0.3)
  ax.legend(fontsize=8)
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return [path]
