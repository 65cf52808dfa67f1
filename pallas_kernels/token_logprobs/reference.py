"""Pure-jnp reference: materialises the full [T, V] logits (the truth the chunked paths are tested against)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs_reference(
  hidden: jax.Array,
  lm_head: jax.Array,
  targets: jax.Array,
  *,
  temperature: float = 1.0,
  soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(log p(target), entropy) per token from logits = soft_cap(hidden @ lm_head) / temperature.

  soft_cap(z) = c * tanh(z / c) (identity when None). Gradients come from plain autodiff.
  """
  logits = jnp.einsum('...d,dv->...v', hidden, lm_head, preferred_element_type=jnp.float32)
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  logits = logits / temperature
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
  return picked, entropy
