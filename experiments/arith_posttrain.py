"""Post-training on kj_arith: the stage pipeline of `configs/arith/posttrain.py`, then its table.

Every stage (SFT, sampling, pairs, DPO, RFT, RLMEC rewrites, RLMEC, GRPO) runs through
`kuaijax.stages.run_pipeline`, once per training seed of `config.seeds`, each in
`<workdir>/seed_<s>/<stage>/` and resumable; every stage that produces a policy is evaluated by
`config.evals` (held-out accuracy by level, sampled over several sampling seeds, plus greedy). This file only builds the table (results.md / results.json) and the loss curves
(loss_curves.png).
"""

from __future__ import annotations

import json
import os
import time

import jax

from kuaijax import plotting
from kuaijax.losses import rl
from kuaijax.results import write_results
from kuaijax.stages import report, run_pipeline


def _label(block: dict) -> str:
  """A stage's row name; a GRPO stage names its loss type and advantage scaling."""
  if block.get('method') != 'grpo':
    return block['label']
  loss_type = block.get('loss', {}).get('loss_type', 'grpo')
  scale = rl.resolve_advantage_scale(
    block.get('options', {}).get('advantage_scale', 'auto'), loss_type
  )
  return f'{block["label"]} ({loss_type}, {scale})'


def results_table(runs: dict, config) -> str:
  """Markdown: sampled accuracy (%) by level per policy, and greedy; then each stage's steps, wall
  time and data summary (first seed)."""
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
    '| policy | ' + ' | '.join(f'level {k}' for k in groups) + ' | all | greedy all |',
    '|---|' + '---:|' * (len(groups) + 2),
  ]
  first = runs[next(iter(runs))]
  for name, info in first.items():
    if 'eval' not in info:
      continue
    evals = [stages[name]['eval'] for stages in runs.values()]
    cells = [report.accuracy_cell(evals, f'accuracy/level_{k}') for k in groups] + [
      report.accuracy_cell(evals, 'accuracy')
    ]
    greedy = report.accuracy_cell(evals, 'greedy/accuracy', sampled=False)
    lines.append(f'| {_label(info["block"])} | ' + ' | '.join(cells) + f' | {greedy} |')
  lines += ['', '| stage | type | steps | wall time (s) | data |', '|---|---|---:|---:|---|']
  for name, info in first.items():
    summary = {k: v for k, v in info['summary'].items() if k not in ('steps', 'last_train_metrics')}
    steps = info['summary'].get('steps', '')
    data = json.dumps(summary, sort_keys=True)
    lines.append(f'| {name} | {info["type"]} | {steps} | {info["wall_s"]:.0f} | {data} |')
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  runs = run_pipeline(config, workdir)
  results = {
    'runs': report.without_blocks(runs),
    'order': list(runs[config.seeds[0]]),
    'seeds': report.seeds_record(config),
    'wall_s': time.time() - start,
  }
  table = results_table(runs, config)
  if jax.process_index() == 0:
    plots = plotting.write_loss_curves(workdir, report.trained_stage_dirs(runs, workdir))
    results['plots'] = [os.path.basename(p) for p in plots]
  write_results(workdir, results, table)
  print(table)
  return results
