"""Next-token cross-entropy over packed batches, with per-task sums for evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token -log p(target) and logsumexp of the logits, both float32 [b, l]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - target_logit, lse


def lm_loss(
  logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, *, z_loss: float = 0.0
) -> tuple[jax.Array, dict]:
  """Mean next-token cross-entropy over the masked tokens (plus optional z-loss).

  Returns `(loss, metrics)`; metrics hold `ce` (the cross-entropy alone), `z_loss`, `tokens`.
  A batch with no target tokens gives loss 0, not NaN.
  """
  mask = loss_mask.astype(jnp.float32)
  ce, lse = token_cross_entropy(logits, targets)
  tokens = mask.sum()
  denom = jnp.maximum(tokens, 1.0)
  mean_ce = (ce * mask).sum() / denom
  mean_z = (jnp.square(lse) * mask).sum() / denom
  loss = mean_ce + z_loss * mean_z
  return loss, {'ce': mean_ce, 'z_loss': mean_z, 'tokens': tokens}


def per_task_sums(
  token_losses: jax.Array, loss_mask: jax.Array, task_ids: jax.Array, num_tasks: int
) -> tuple[jax.Array, jax.Array]:
  """Sums of token losses and token counts per task id: two [num_tasks] float32 arrays."""
  mask = loss_mask.astype(jnp.float32)
  onehot = jax.nn.one_hot(task_ids, num_tasks, dtype=jnp.float32) * mask[..., None]
  return jnp.einsum('bl,blt->t', token_losses.astype(jnp.float32), onehot), onehot.sum((0, 1))
