"""LM loss and perplexity per task tag over a fixed list of evaluation batches.

Every evaluation sees exactly the same tokens (the batches are built once), so numbers are
comparable across steps, runs and models; the unigram baseline is scored on the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from flax import nnx

from kuaijax import parallel
from kuaijax.evals.base import Evaluator
from kuaijax.evals.registry import register_evaluator
from kuaijax.jit_cache import ParamsJit
from kuaijax.losses.lm import per_task_sums, token_cross_entropy


def _summarise(loss_sums: np.ndarray, counts: np.ndarray, task_names: Sequence[str]) -> dict:
  out = {}
  total = counts.sum()
  out['loss'] = float(loss_sums.sum() / max(total, 1))
  out['ppl'] = math.exp(min(out['loss'], 50.0))
  for i, name in enumerate(task_names):
    if counts[i] > 0:
      out[f'loss/{name}'] = float(loss_sums[i] / counts[i])
      out[f'ppl/{name}'] = math.exp(min(out[f'loss/{name}'], 50.0))
      out[f'tokens/{name}'] = int(counts[i])
  return out


class BatchEvaluator(Evaluator):
  """Runs a jitted per-batch function over fixed evaluation batches, sharded on the mesh.

  Subclasses give `batch_fn(model, batch)` (traced; compiled once per model graph) and reduce what
  `batch_outputs` yields.
  """

  def __init__(self, batches: Sequence[dict], task_names: Sequence[str], *, mesh, rules):
    if not batches:
      raise ValueError('the evaluation set is empty: no evaluation batches were built')
    self.batches = list(batches)
    self.task_names = tuple(task_names)
    self._mesh, self._rules = mesh, rules
    self._fn = ParamsJit(self.batch_fn)

  def batch_fn(self, model: nnx.Module, batch: dict):
    raise NotImplementedError

  def batch_outputs(self, graphdef, params):
    """Yields the host copy of `batch_fn`'s output for every batch, in order (whole arrays: rows
    from every process)."""
    with parallel.axis_rules(self._mesh, self._rules):
      for batch in self.batches:
        sharded = parallel.shard_batch(batch, self._mesh, self._rules)
        yield parallel.host_value(self._fn(graphdef, params, sharded))


class LMEvaluator(BatchEvaluator):
  """Loss and perplexity per task on pre-built batches."""

  def batch_fn(self, model, batch):
    logits, _ = model(
      batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids']
    )
    ce, _ = token_cross_entropy(logits, batch['targets'])
    return per_task_sums(ce, batch['loss_mask'], batch['task_ids'], len(self.task_names))

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    loss_sums = np.zeros(len(self.task_names))
    counts = np.zeros(len(self.task_names))
    for s, c in self.batch_outputs(graphdef, params):
      loss_sums += np.asarray(s, np.float64)
      counts += np.asarray(c, np.float64)
    return _summarise(loss_sums, counts, self.task_names)


@register_evaluator('lm_loss')
def build(options: dict, ctx) -> LMEvaluator:
  """Loss / perplexity per task on the LM evaluation batches (ctx.lm_batches); no options."""
  del options
  batches = ctx.require_lm_batches('lm_loss')
  return LMEvaluator(batches, ctx.task_names, mesh=ctx.mesh, rules=ctx.rules)


def unigram_baseline(
  counts: np.ndarray, batches: Sequence[dict], task_names: Sequence[str]
) -> dict:
  """Loss of the add-one-smoothed unigram distribution `counts` on the same evaluation batches
  (every process's batches: a collective in multi-process jobs, like the model's evaluation)."""
  counts = np.asarray(counts, np.float64) + 1.0
  neg_logp = -np.log(counts / counts.sum())
  loss_sums = np.zeros(len(task_names))
  token_counts = np.zeros(len(task_names))
  for batch in batches:
    mask = np.asarray(batch['loss_mask']) > 0
    tasks = np.asarray(batch['task_ids'])[mask]
    losses = neg_logp[np.asarray(batch['targets'])[mask]]
    loss_sums += np.bincount(tasks, weights=losses, minlength=len(task_names))
    token_counts += np.bincount(tasks, minlength=len(task_names))
  totals = parallel.gather_process_rows(np.stack([loss_sums, token_counts])[None]).sum(0)
  return _summarise(totals[0], totals[1], task_names)
