"""Train the decoder LM on an embedded corpus; report validation loss per task vs a unigram baseline.

The training is the pipeline of configs/lm/mixture.py (`kuaijax.stages.run_pipeline`): the
'pretrain' stage 'lm' per training seed in `<workdir>/seed_<s>/lm/` (metrics.jsonl, checkpoints,
stage.json with the final evaluation). This file adds the unigram baseline and writes
results.json, results.md (the table; mean ± std over training seeds when there are several) and
loss_curves.png (training and per-task validation loss, unigram baselines dashed) into the workdir.
"""

from __future__ import annotations

import os

from kuaijax import plotting
from kuaijax.data import pipeline
from kuaijax.evals.lm_loss import unigram_baseline
from kuaijax.results import write_results
from kuaijax.stages import pretrain, report, roles, run_pipeline
from kuaijax.train import lm_task


def results_table(task_names, model_eval: dict, model_std: dict, unigram: dict, title: str) -> str:
  """Markdown table: one row per task (and all tasks), model vs unigram loss and perplexity."""
  lines = [
    f'## {title}',
    '',
    '| task | tokens | model loss | unigram loss | model ppl | unigram ppl |',
    '|---|---:|---:|---:|---:|---:|',
  ]
  for name in (*task_names, None):
    key = 'loss' if name is None else f'loss/{name}'
    if key not in model_eval:
      continue
    ppl = 'ppl' if name is None else f'ppl/{name}'
    tokens = (
      sum(model_eval.get(f'tokens/{t}', 0) for t in task_names)
      if name is None
      else model_eval[f'tokens/{name}']
    )
    lines.append(
      f'| {name or "all"} | {tokens} | {report.cell(model_eval, model_std, key)} | '
      f'{unigram[key]:.4f} | {report.cell(model_eval, model_std, ppl, ".2f")} | '
      f'{unigram[ppl]:.2f} |'
    )
  return '\n'.join(lines) + '\n'


def unigram(config, workdir: str, role: str) -> dict:
  """The unigram model of the training split, scored on the evaluation batches (seed-free)."""
  cfg = roles.role_config(config, role)
  data = lm_task.build_lm_data(cfg, workdir, tokenizer_dir=pretrain.tokenizer_dir(workdir))
  counts = pipeline.unigram_counts(
    data.train_source, data.tokenizer, max_examples=config.eval.unigram_max_examples or None
  )
  return unigram_baseline(counts, data.eval_batches, data.task_names)


def run(config, workdir: str) -> dict:
  runs = run_pipeline(config, workdir)
  first = runs[config.seeds[0]]
  trained = [n for n, info in first.items() if info['type'] == 'pretrain']
  if not trained:
    raise ValueError(f'config.stages={config.stages!r} has no pretrain stage')
  name = trained[-1]  # the reported model: the last pretrain stage (one, 'lm', by default)
  info = first[name]
  model_eval, model_std = report.eval_over_seeds([stages[name]['eval'] for stages in runs.values()])
  baseline = unigram(config, workdir, info['model'])
  plots = plotting.write_loss_curves(
    workdir, [os.path.relpath(info['dir'], workdir)], baselines=baseline
  )
  task_names = tuple(config.data.task_names)
  results = {
    'seeds': report.seeds_record(config),
    'stage': name,
    'step': info['summary']['steps'],
    'model': model_eval,
    'model_std': model_std,
    'unigram': baseline,
    'beats_unigram': {
      t: model_eval[f'loss/{t}'] < baseline[f'loss/{t}']
      for t in task_names
      if f'loss/{t}' in baseline and f'loss/{t}' in model_eval
    },
    'num_params': info['summary']['params']['total'],
    'runs': report.without_blocks(runs),
    'plots': [os.path.basename(p) for p in plots],
  }
  table = results_table(
    task_names,
    model_eval,
    model_std,
    baseline,
    f'Validation loss per task after {results["step"]} steps ({config.data.name}; '
    f'{report.spread_note(runs)})',
  )
  write_results(workdir, results, table)
  print(table)
  return results
