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

from kuaijax import plotting
from kuaijax.losses import rl
from kuaijax.train.pipeline import run_pipeline
from kuaijax.train.trainer import write_results


def _cell(summary: dict, key: str) -> str:
  if key not in summary:
    return '-'
  return f'{100 * summary[key]:.1f} ± {100 * summary[key + "/std"]:.1f}'


def _label(block: dict) -> str:
  """A stage's row name; a GRPO stage names its loss type and advantage scaling."""
  if block.get('method') != 'grpo':
    return block['label']
  loss_type = block.get('loss', {}).get('loss_type', 'grpo')
  scale = rl.resolve_advantage_scale(
    block.get('options', {}).get('advantage_scale', 'auto'), loss_type
  )
  return f'{block["label"]} ({loss_type}, {scale})'


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
    lines.append(f'| {_label(info["block"])} | ' + ' | '.join(cells) + f' | {greedy} |')
  lines += ['', '| stage | type | steps | wall time (s) | data |', '|---|---|---:|---:|---|']
  for name, info in stages.items():
    summary = {k: v for k, v in info['summary'].items() if k not in ('steps', 'last_train_metrics')}
    steps = info['summary'].get('steps', '')
    data = json.dumps(summary, sort_keys=True)
    lines.append(f'| {name} | {info["type"]} | {steps} | {info["wall_s"]:.0f} | {data} |')
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  stages = run_pipeline(config, workdir)
  results = {'stages': stages, 'order': list(stages), 'wall_s': time.time() - start}
  table = results_table(stages, config)
  if jax.process_index() == 0:
    trained = [name for name, info in stages.items() if info['type'] == 'train']
    results['plots'] = [os.path.basename(p) for p in plotting.write_loss_curves(workdir, trained)]
  write_results(workdir, results, table)
  print(table)
  return results
