"""Post-training on kj_arith: the stage pipeline of `configs/arith/posttrain.py`, then its table.

Every stage (SFT, sampling, pairs, DPO, RFT, RLMEC rewrites, RLMEC, GRPO) runs through
`kuaijax.train.pipeline.run_pipeline`, each in `<workdir>/<stage>/` and resumable; every stage that
produces a policy is evaluated by `config.evals` (held-out accuracy by level, sampled over several
seeds plus greedy). This file only builds the table (results.md / results.json) and the loss curves
(loss_curves.png).
"""

from __future__ import annotations

import json
import os
import time

import jax
from matplotlib.figure import Figure

from kuaijax.train.metrics import read_metrics
from kuaijax.train.pipeline import run_pipeline
from kuaijax.train.trainer import write_results


def _cell(summary: dict, key: str) -> str:
  if key not in summary:
    return '-'
  return f'{100 * summary[key]:.1f} ± {100 * summary[key + "/std"]:.1f}'


def results_table(stages: dict, config) -> str:
  """Markdown: sampled accuracy (%) by level, mean ± sample std over the seeds, and greedy; then
  each stage's steps, wall time and data summary."""
  ev = next(iter(config.evals.values()))
  groups = list(ev.groups)
  lines = [
    f'## kj_arith held-out accuracy (%), {ev.split} split, {ev.per_group} problems per level; '
    f'sampled at T={ev.temperature}: mean ± std over {len(ev.seeds)} seeds',
    '',
    '| policy | ' + ' | '.join(f'level {k}' for k in groups) + ' | all | greedy all |',
    '|---|' + '---:|' * (len(groups) + 2),
  ]
  for info in stages.values():
    if 'eval' not in info:
      continue
    e = info['eval']
    cells = [_cell(e, f'accuracy/level_{k}') for k in groups] + [_cell(e, 'accuracy')]
    greedy = f'{100 * e["greedy/accuracy"]:.1f}' if 'greedy/accuracy' in e else '-'
    lines.append(f'| {info["block"]["label"]} | ' + ' | '.join(cells) + f' | {greedy} |')
  lines += ['', '| stage | type | steps | wall time (s) | data |', '|---|---|---:|---:|---|']
  for name, info in stages.items():
    summary = {k: v for k, v in info['summary'].items() if k not in ('steps', 'last_train_metrics')}
    steps = info['summary'].get('steps', '')
    data = json.dumps(summary, sort_keys=True)
    lines.append(f'| {name} | {info["type"]} | {steps} | {info["wall_s"]:.0f} | {data} |')
  return '\n'.join(lines) + '\n'


def plot_losses(stages: dict, workdir: str) -> str | None:
  """loss_curves.png: the training loss of every training stage against its step."""
  curves = {}
  for name, info in stages.items():
    if info['type'] == 'train':
      records = [r for r in read_metrics(os.path.join(workdir, name)) if 'loss' in r]
      curves[name] = ([r['step'] for r in records], [r['loss'] for r in records])
  if not curves:
    return None
  fig = Figure(figsize=(4 * len(curves), 3.2))
  for ax, (name, (steps, losses)) in zip(
    fig.subplots(1, len(curves), squeeze=False)[0], curves.items()
  ):
    ax.plot(steps, losses, marker='.')
    ax.set(title=name, xlabel='step', ylabel='loss')
    ax.grid(alpha=0.3)
  path = os.path.join(workdir, 'loss_curves.png')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return path


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  stages = run_pipeline(config, workdir)
  results = {'stages': stages, 'order': list(stages), 'wall_s': time.time() - start}
  table = results_table(stages, config)
  if jax.process_index() == 0:
    plot = plot_losses(stages, workdir)
    results['plots'] = [os.path.basename(plot)] if plot else []
  write_results(workdir, results, table)
  print(table)
  return results
