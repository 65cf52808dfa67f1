"""The unfused router: x @ W_r in float32, then `kuaijax.routing` (the truth every path must match)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kuaijax import routing


def topp_router(x: jax.Array, router_w: jax.Array, *, p: float, k_max: int | None = None):
  """(weights[T, k_max] f32, expert_ids[T, k_max] int32, counts[E] int32, logits[T, E] f32)."""
  num_experts = router_w.shape[1]
  logits = jnp.asarray(x, jnp.float32) @ jnp.asarray(router_w, jnp.float32)
  weights, expert_ids = routing.top_p(routing.router_probs(logits), p=p, k_max=k_max)
  counts = jnp.sum(routing.assignment_counts(expert_ids, num_experts), axis=0).astype(jnp.int32)
  return weights, expert_ids, counts, logits
