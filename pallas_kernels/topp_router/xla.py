"""The fused XLA path (fast on CPU) and the shared pieces every implementation uses.

Forward: one float32 matmul and a softmax, then the k_max slots by k_max passes of max over the
experts carrying the exclusive cumulative sum (the kernels' body, `select_slots`) when k_max is small,
else `kuaijax.routing.top_p` (`lax.top_k` of size k_max, never a full sort, and a cumulative sum
over those slots).
Backward (shared by all implementations through api.py's custom_vjp): the cotangents of the kept
weights are spread onto the [T, E] probabilities by comparing ids (no scatter), through the
softmax, then two matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kuaijax import routing

F32 = jnp.float32
# Up to this many slots, k_max passes of max over [T, E] beat `lax.top_k` on CPU (about 2x at k_max
# = 4, E = 8..64, T = 8192; measured by bench.py's harness).
ITERATIVE_MAX_K = 8


def logits_of(x: jax.Array, router_w: jax.Array) -> jax.Array:
  """Router logits [T, E] in float32 (bf16 products are exact in f32; accumulation in f32)."""
  return jnp.dot(x, router_w, preferred_element_type=F32).astype(F32)


def select_slots(probs, row_valid, *, p: float, k_slots: int, k_counted: int, num_experts: int):
  """Top-P over the top `k_slots` experts by repeated max (ties: lowest id), as kernels do it.

  probs [t, e] float32 where entries < 0 mean 'not an expert' (padding); row_valid [t, 1] bool.
  Returns weights and ids [t, k_slots] (dropped: 0 and `num_experts`) and counts [1, e] int32 of the
  first `k_counted` slots over valid rows. Only 2-D array ops, so Pallas bodies can call it.
  """
  t, e = probs.shape
  cols = jax.lax.broadcasted_iota(jnp.int32, (t, e), 1)
  slots = jax.lax.broadcasted_iota(jnp.int32, (t, k_slots), 1)
  remaining = probs
  before = jnp.zeros((t, 1), F32)
  weights = jnp.zeros((t, k_slots), F32)
  ids = jnp.full((t, k_slots), num_experts, jnp.int32)
  counts = jnp.zeros((1, e), jnp.int32)
  for s in range(k_slots):
    top = jnp.max(remaining, axis=1, keepdims=True)
    idx = jnp.min(jnp.where(remaining == top, cols, e), axis=1, keepdims=True)
    keep = (before <= p) & (top >= 0)
    weights = jnp.where((slots == s) & keep, top, weights)
    ids = jnp.where((slots == s) & keep, idx, ids)
    if s < k_counted:
      hit = (cols == idx) & keep & row_valid
      counts = counts + jnp.sum(hit.astype(jnp.int32), axis=0, keepdims=True)
    before = before + top
    remaining = jnp.where(cols == idx, -1.0, remaining)
  return weights, ids, counts


def route_block(z, row_valid, *, p: float, k_slots: int, k_counted: int, num_experts: int):
  """A kernel's block: logits z [t, e_pad] (columns >= num_experts are padding) -> softmax -> slots."""
  cols = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
  expert = cols < num_experts
  m = jnp.max(jnp.where(expert, z, -jnp.inf), axis=1, keepdims=True)
  ez = jnp.where(expert, jnp.exp(z - m), 0.0)
  probs = jnp.where(expert, ez / jnp.sum(ez, axis=1, keepdims=True), -1.0)
  return select_slots(
    probs, row_valid, p=p, k_slots=k_slots, k_counted=k_counted, num_experts=num_experts
  )


def forward(x: jax.Array, router_w: jax.Array, *, p: float, k_max: int):
  num_experts = router_w.shape[1]
  logits = logits_of(x, router_w)
  if k_max <= ITERATIVE_MAX_K:
    valid = jnp.ones((logits.shape[0], 1), bool)
    weights, expert_ids, counts = route_block(
      logits, valid, p=p, k_slots=k_max, k_counted=k_max, num_experts=num_experts
    )
    return weights, expert_ids, counts[0], logits
  weights, expert_ids = routing.top_p(jax.nn.softmax(logits, axis=-1), p=p, k_max=k_max)
  counts = jnp.bincount(expert_ids.reshape(-1), length=num_experts + 1)[:num_experts]
  return weights, expert_ids, counts.astype(jnp.int32), logits


def backward(x, router_w, logits, expert_ids, d_weights, d_logits):
  """(dx, d_router_w) from the cotangents of weights [T, K] and logits [T, E]."""
  num_experts = router_w.shape[1]
  probs = jax.nn.softmax(logits, axis=-1)
  hit = expert_ids[:, :, None] == jnp.arange(num_experts)
  d_probs = jnp.sum(jnp.where(hit, d_weights[:, :, None], 0.0), axis=1)
  dz = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True)) + d_logits
  dx = jnp.dot(dz, router_w.astype(F32).T).astype(x.dtype)
  dw = jnp.dot(x.astype(F32).T, dz).astype(router_w.dtype)
  return dx, dw
