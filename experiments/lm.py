"""Train the decoder LM on an embedded corpus; report validation loss per task vs a unigram baseline.

Writes metrics.jsonl, checkpoints, results.json, results.md (the table) and loss_curves.png (training
and per-task validation loss, unigram baselines dashed) into the workdir.
"""

from __future__ import annotations

import jax

from kuaijax import plotting
from kuaijax.data import pipeline
from kuaijax.evals.lm_loss import unigram_baseline
from kuaijax.results import write_results
from kuaijax.train import lm_task
from kuaijax.train.trainer import train


def results_table(task_names, model_eval: dict, unigram: dict, title: str) -> str:
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
      f'| {name or "all"} | {tokens} | {model_eval[key]:.4f} | {unigram[key]:.4f} | '
      f'{model_eval[ppl]:.2f} | {unigram[ppl]:.2f} |'
    )
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> dict:
  data = lm_task.build_lm_data(config, workdir)
  evaluators = lm_task.build_evaluators(config, data)
  result = train(
    config,
    workdir,
    model_factory=lm_task.model_factory(config.model),
    loss_fn=lm_task.lm_loss_fn(config.train.z_loss),
    train_dataset=data.train_dataset,
    evaluate=evaluators.evaluate,
  )
  counts = pipeline.unigram_counts(
    data.train_source, data.tokenizer, max_examples=config.eval.unigram_max_examples or None
  )
  unigram = unigram_baseline(counts, data.eval_batches, data.task_names)
  plotting.write_loss_curves(workdir, baselines=unigram)
  results = {
    'step': result.step,
    'model': result.last_eval,
    'unigram': unigram,
    'beats_unigram': {
      t: result.last_eval[f'loss/{t}'] < unigram[f'loss/{t}']
      for t in data.task_names
      if f'loss/{t}' in unigram
    },
    'num_params': int(sum(x.size for x in jax.tree.leaves(result.params))),
  }
  table = results_table(
    data.task_names,
    result.last_eval,
    unigram,
    f'Validation loss per task after {result.step} steps ({config.data.name})',
  )
  write_results(workdir, results, table)
  print(table)
  return results
