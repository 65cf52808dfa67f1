"""Experts per token of an MoE model on fixed evaluation batches: per task, per layer, histograms.

The MoE layers report `experts_per_token` [batch, length] in their aux dict (see
`kuaijax.models.moe`); this evaluator averages it over the target tokens (`loss_mask`) of each task
(`task_ids`), which is the paper's "harder tasks need more experts" measurement at inference. Dense
layers (empty aux) are skipped; a model with no MoE layer gives an empty dict.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kuaijax.evals.lm_loss import BatchEvaluator
from kuaijax.losses.lm import per_task_sums


class MoEStatsEvaluator(BatchEvaluator):
  """Experts-per-token statistics over pre-built batches (the LMEvaluator's batches).

  Metrics: `experts_per_token` and `experts_per_token/{task}` (mean over MoE layers and target
  tokens), per MoE layer i `moe/layer{i}/mean_k`, `moe/layer{i}/experts_per_token/{task}`, the
  masked `moe/layer{i}/k_hist` (fraction of target tokens using k = 0.. experts) and
  `moe/layer{i}/expert_load` (the layer's own per-batch load, averaged over batches; lists).
  """

  def batch_fn(self, model, batch):
    _, extras = model(
      batch['inputs'],
      positions=batch['positions'],
      segment_ids=batch['segment_ids'],
      return_hidden=True,
    )
    out = {}
    for i, aux in enumerate(extras['mlp_aux']):
      if 'experts_per_token' not in aux:
        continue
      k = aux['experts_per_token']
      sums, counts = per_task_sums(k, batch['loss_mask'], batch['task_ids'], len(self.task_names))
      mask = batch['loss_mask'].astype(jnp.float32)
      hist = jax.nn.one_hot(k.astype(jnp.int32), aux['k_hist'].shape[0]) * mask[..., None]
      out[i] = (sums, counts, hist.sum((0, 1)), aux['expert_load'])
    return out

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    totals = {}
    for out in self.batch_outputs(graphdef, params):
      for layer, values in out.items():
        values = [np.asarray(v, np.float64) for v in values]
        if layer in totals:
          totals[layer] = [a + b for a, b in zip(totals[layer], values)]
        else:
          totals[layer] = values
    if not totals:
      return {}
    metrics = {}
    task_sums = np.zeros(len(self.task_names))
    for layer, (sums, counts, hist, load) in sorted(totals.items()):
      prefix = f'moe/layer{layer}'
      metrics[f'{prefix}/mean_k'] = float(sums.sum() / max(counts.sum(), 1))
      for t, name in enumerate(self.task_names):
        if counts[t] > 0:
          metrics[f'{prefix}/experts_per_token/{name}'] = float(sums[t] / counts[t])
      metrics[f'{prefix}/k_hist'] = (hist / max(hist.sum(), 1)).tolist()
      metrics[f'{prefix}/expert_load'] = (load / len(self.batches)).tolist()
      task_sums += sums
    # Every layer sees the same tokens: `counts` is the same for all of them.
    task_counts = counts * len(totals)
    metrics['experts_per_token'] = float(task_sums.sum() / max(task_counts.sum(), 1))
    for t, name in enumerate(self.task_names):
      if task_counts[t] > 0:
        metrics[f'experts_per_token/{name}'] = float(task_sums[t] / task_counts[t])
    return metrics
