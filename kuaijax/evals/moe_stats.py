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
from kuaijax.evals.registry import register_evaluator
from kuaijax.losses.lm import per_task_sums, token_cross_entropy


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


def average_ranks(a: np.ndarray) -> np.ndarray:
  """Ranks 1..n of a 1-D array, ties sharing their average rank (as Spearman's rho needs)."""
  order = np.argsort(a, kind='stable')
  inverse = np.empty_like(order)
  inverse[order] = np.arange(a.size)
  ordered = a[order]
  first = np.r_[True, ordered[1:] != ordered[:-1]]
  tie_group = np.cumsum(first)[inverse]
  bounds = np.r_[np.nonzero(first)[0], a.size]
  return 0.5 * (bounds[tie_group] + bounds[tie_group - 1] + 1)


def spearman(a, b) -> float | None:
  """Spearman's rank correlation; None when either side is constant or has < 3 values."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return None
  return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


class TokenLossExperts(BatchEvaluator):
  """Token-level "harder -> more experts": loss vs experts selected, per MoE layer and task.

  Metrics per MoE layer i: `moe/layer{i}/max_k` (most experts any target token used),
  `moe/layer{i}/loss_k_spearman` (over all target tokens) and `.../loss_k_spearman/{task}`
  (left out where undefined, e.g. a constant k under Top-K routing).
  """

  def batch_fn(self, model, batch):
    logits, extras = model(
      batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids']
    )
    ce, _ = token_cross_entropy(logits, batch['targets'])
    ks = {i: a['experts_per_token'] for i, a in enumerate(extras['mlp_aux']) if a}
    return ce, ks, batch['loss_mask'], batch['task_ids']

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    outs = list(self.batch_outputs(graphdef, params))
    if not outs or not outs[0][1]:
      return {}
    mask = np.concatenate([np.asarray(o[2]).reshape(-1) for o in outs]) > 0
    loss = np.concatenate([np.asarray(o[0]).reshape(-1) for o in outs])[mask]
    task = np.concatenate([np.asarray(o[3]).reshape(-1) for o in outs])[mask]
    metrics = {}
    for layer in outs[0][1]:
      k = np.concatenate([np.asarray(o[1][layer]).reshape(-1) for o in outs])[mask]
      prefix = f'moe/layer{layer}'
      metrics[f'{prefix}/max_k'] = float(k.max())
      rhos = {'': spearman(loss, k)}
      for t, name in enumerate(self.task_names):
        rhos[f'/{name}'] = spearman(loss[task == t], k[task == t])
      metrics.update({f'{prefix}/loss_k_spearman{n}': r for n, r in rhos.items() if r is not None})
    return metrics


@register_evaluator('moe_stats')
def build_moe_stats(options: dict, ctx) -> MoEStatsEvaluator:
  """Experts per token per task and layer, on the LM evaluation batches; no options."""
  del options
  batches = ctx.require_lm_batches('moe_stats')
  return MoEStatsEvaluator(batches, ctx.task_names, mesh=ctx.mesh, rules=ctx.rules)


@register_evaluator('moe_token_loss')
def build_moe_token_loss(options: dict, ctx) -> TokenLossExperts:
  """Per layer: most experts any token used, and the Spearman correlation of token loss vs experts
  selected (overall and per task), on the LM evaluation batches; no options."""
  del options
  batches = ctx.require_lm_batches('moe_token_loss')
  return TokenLossExperts(batches, ctx.task_names, mesh=ctx.mesh, rules=ctx.rules)


EXPERT_WEIGHTS = ('w1', 'w2', 'w3')


def layer_values(ev: dict, name: str) -> dict:
  """{layer index: ev['moe/layer{i}/<name>']} over the MoE layers that report it."""
  out = {}
  for key, value in ev.items():
    head, _, rest = key.partition('/')
    layer, _, metric = rest.partition('/')
    if head == 'moe' and layer.startswith('layer') and metric == name:
      out[int(layer.removeprefix('layer'))] = value
  return out


def parameter_counts(params, eval_metrics: dict) -> dict:
  """Total parameters and parameters activated per token: each layer's expert weights count
  (its measured `moe/layer{i}/mean_k` of `eval_metrics`) / (its number of experts). 'active' is
  None when an MoE layer's mean k was not measured (no moe_stats evaluator). `params` may be
  abstract (shapes only)."""
  total = expert_total = active_experts = 0.0
  measured = True
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, 'key', getattr(k, 'idx', None)) for k in path]
    total += leaf.size
    if keys[-1] in EXPERT_WEIGHTS and leaf.ndim == 3 and 'layers' in keys:
      layer = keys[keys.index('layers') + 1]
      mean_k = eval_metrics.get(f'moe/layer{layer}/mean_k')
      expert_total += leaf.size
      if mean_k is None:
        measured = False
      else:
        active_experts += leaf.size * mean_k / leaf.shape[0]
  active = float(total - expert_total + active_experts) if measured else None
  return {'total': int(total), 'active': active}
