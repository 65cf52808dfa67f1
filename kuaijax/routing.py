"""Expert selection and router losses for MoE layers: pure functions over router probabilities.

Everything is computed in float32 whatever the input dtype. Probabilities are `[..., E]` (usually
`[T, E]`); selections are `(weights[..., K], expert_ids[..., K] int32)` in descending probability
order (ties: lower expert id first). A slot that selects nothing carries weight 0 and the sentinel id
`E`, so per-token variable expert counts fit static shapes.

Top-P (dynamic routing, arXiv 2403.07652; experiments/topp_moe/README.md): expert j in sorted order is kept iff the
*exclusive* cumulative probability of the experts before it is <= p. The top-1 expert is therefore
always kept, and p = 1 keeps every expert. Weights are the raw probabilities (no renormalisation).

Losses (`balance_loss`, `router_entropy`, `router_z_loss`) and `routing_stats` take an optional
token `mask` (1 = real token) so padding does not count; means are over the masked tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_k(name: str, value, num_experts: int) -> int:
  """Validates an expert count (`k`, `k_max`): an int in [1, num_experts]."""
  if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_experts:
    raise ValueError(
      f'{name}={value!r} must be an int in [1, {num_experts}] (the number of experts)'
    )
  return value


def check_p(p) -> float:
  """Validates the Top-P threshold: a number in (0, 1]."""
  if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
    raise ValueError(f'p={p!r} must be a number in (0, 1]')
  return float(p)


def _probs_f32(probs) -> jax.Array:
  probs = jnp.asarray(probs)
  if probs.ndim < 1 or probs.shape[-1] < 1:
    raise ValueError(f'probs must have a trailing experts axis, got shape {probs.shape}')
  return probs.astype(jnp.float32)


def router_probs(logits: jax.Array) -> jax.Array:
  """Softmax over experts in float32 (the router is always evaluated in float32)."""
  return jax.nn.softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)


# Uncapped Top-P over many experts first sorts only the top FAST_HEAD of every token: when each
# token's first FAST_HEAD probabilities already sum past p, no later expert can be kept and the sort
# over all E experts is skipped (a `lax.cond`; the result is the same either way).
FAST_HEAD = 8


def _sorted_head(probs, k: int, p: float) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(probs, k)` where only the experts a Top-P-by-`p` selection can keep matter: the
  slots past a token's kept set may hold (0, E) instead of the next experts."""
  num_experts = probs.shape[-1]
  if k < num_experts or num_experts <= 2 * FAST_HEAD:
    return jax.lax.top_k(probs, k)

  top, ids = jax.lax.top_k(probs, FAST_HEAD)
  pad = [(0, 0)] * (top.ndim - 1) + [(0, k - FAST_HEAD)]
  padded = lambda operands: (
    jnp.pad(operands[1], pad),
    jnp.pad(operands[2], pad, constant_values=num_experts),
  )
  full = lambda operands: tuple(jax.lax.top_k(operands[0], k))
  return jax.lax.cond(jnp.all(top.sum(-1) > p), padded, full, (probs, top, ids))


def top_p_with_truncation(probs, *, p, k_max: int | None = None):
  """Top-P selection, plus which tokens had their Top-P set cut by `k_max`.

  Returns `(weights[..., k_max] f32, expert_ids[..., k_max] int32, truncated[...] bool)`.
  A token is truncated when the expert after its `k_max`-th would also have been kept, i.e. the
  inclusive probability mass of its top `k_max` experts is still <= p (and k_max < E).
  """
  probs = _probs_f32(probs)
  num_experts = probs.shape[-1]
  p = check_p(p)
  k_max = num_experts if k_max is None else check_k('k_max', k_max, num_experts)
  top, ids = _sorted_head(probs, k_max, p)
  inclusive = jnp.cumsum(top, axis=-1)
  exclusive = jnp.concatenate([jnp.zeros_like(inclusive[..., :1]), inclusive[..., :-1]], axis=-1)
  keep = exclusive <= p
  weights = jnp.where(keep, top, 0.0)
  expert_ids = jnp.where(keep, ids, num_experts).astype(jnp.int32)
  if k_max < num_experts:
    truncated = inclusive[..., -1] <= p
  else:
    truncated = jnp.zeros(probs.shape[:-1], bool)
  return weights, expert_ids, truncated


def top_p(probs, *, p, k_max: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Dynamic Top-P routing: `(weights[..., k_max], expert_ids[..., k_max])` (k_max None -> E).

  Gradients reach `probs` only through the kept weights (the keep mask is a comparison).
  """
  weights, expert_ids, _ = top_p_with_truncation(probs, p=p, k_max=k_max)
  return weights, expert_ids


def top_k(probs, *, k: int, renormalize: bool = False) -> tuple[jax.Array, jax.Array]:
  """Top-K routing: `(weights[..., k], expert_ids[..., k])`, optionally renormalised over the k."""
  probs = _probs_f32(probs)
  k = check_k('k', k, probs.shape[-1])
  weights, ids = jax.lax.top_k(probs, k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, ids.astype(jnp.int32)


def _token_mean(values: jax.Array, mask) -> jax.Array:
  """Mean over the leading (token) axis of `values` [M, ...], counting only masked-in tokens."""
  if mask is None:
    return jnp.mean(values, axis=0)
  m = jnp.asarray(mask, jnp.float32).reshape(-1)
  m = m.reshape(m.shape + (1,) * (values.ndim - 1))
  return jnp.sum(values * m, axis=0) / jnp.maximum(jnp.sum(m), 1.0)


def assignment_counts(expert_ids: jax.Array, num_experts: int) -> jax.Array:
  """How many of a token's slots picked each expert: `[..., E]` float32 (sentinel ids ignored)."""
  return jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=-2)


def expert_load(expert_ids, num_experts: int, *, mask=None) -> jax.Array:
  """Fraction of (masked) tokens that selected each expert, [E] float32 (sums to the mean k).

  A scatter-add over the [M, K] selections (linear in K, unlike the [M, K, E] one-hot counts).
  """
  ids = jnp.asarray(expert_ids).reshape(-1, jnp.shape(expert_ids)[-1])
  m = jnp.ones(ids.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  m = m.reshape(-1)
  load = (
    jnp.zeros((num_experts,), jnp.float32)
    .at[ids]
    .add(jnp.broadcast_to(m[:, None], ids.shape), mode='drop')
  )
  return load / jnp.maximum(jnp.sum(m), 1.0)


def balance_loss(probs, expert_ids, *, mask=None) -> jax.Array:
  """The paper's load-balance loss `N * sum_i f_i * Q_i`.

  f_i = fraction of tokens that kept expert i (sum_i f_i = mean experts per token), Q_i = mean
  router probability of expert i. Only Q carries gradient.
  """
  probs = _probs_f32(probs)
  num_experts = probs.shape[-1]
  f = expert_load(expert_ids, num_experts, mask=mask)
  q = _token_mean(probs.reshape(-1, num_experts), mask)
  return num_experts * jnp.sum(jax.lax.stop_gradient(f) * q)


def router_entropy(probs, *, mask=None) -> jax.Array:
  """Mean per-token entropy `-sum_i P_i log P_i` (the paper's dynamic loss); 0 log 0 = 0."""
  probs = _probs_f32(probs)
  plogp = probs * jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
  return _token_mean(-jnp.sum(plogp, axis=-1).reshape(-1), mask)


def router_z_loss(logits, *, mask=None) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of `logsumexp(logits)^2`."""
  logits = _probs_f32(logits)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return _token_mean(jnp.square(lse).reshape(-1), mask)


def routing_stats(expert_ids, num_experts: int, *, truncated=None, mask=None) -> dict:
  """Per-layer routing statistics of one batch.

  Returns scalars `mean_k`, `max_k` (and `trunc_rate` when `truncated` is given: the fraction of
  tokens whose Top-P set was cut by k_max), the vectors `k_hist` [K+1] (fraction of tokens using
  k = 0..K experts) and `expert_load` [E] (fraction of tokens sent to each expert; sums to mean_k),
  and `experts_per_token` (float32, the shape of `expert_ids` without its slot axis).
  """
  expert_ids = jnp.asarray(expert_ids)
  num_slots = expert_ids.shape[-1]
  per_token = jnp.sum(expert_ids < num_experts, axis=-1).astype(jnp.float32)
  flat_k = per_token.reshape(-1)
  valid = jnp.ones_like(flat_k) if mask is None else jnp.asarray(mask, jnp.float32).reshape(-1)
  stats = {
    'mean_k': _token_mean(flat_k, mask),
    'max_k': jnp.max(jnp.where(valid > 0, flat_k, 0.0)),
    'k_hist': _token_mean(jax.nn.one_hot(flat_k.astype(jnp.int32), num_slots + 1), mask),
    'expert_load': expert_load(expert_ids, num_experts, mask=mask),
    'experts_per_token': per_token,
  }
  if truncated is not None:
    stats['trunc_rate'] = _token_mean(jnp.asarray(truncated, jnp.float32).reshape(-1), mask)
  return stats
