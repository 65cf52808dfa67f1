"""AdamW with linear warm-up and cosine decay, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
  warmup = int(opt_config.warmup_steps)
  if warmup < 0 or total_steps <= 0:
    raise ValueError(
      f'optimizer.warmup_steps={warmup} and train.steps={total_steps} must be >= 0 and > 0'
    )
  if not opt_config.lr > 0:
    raise ValueError(f'optimizer.lr must be > 0, got {opt_config.lr}')
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt_config.lr,
    warmup_steps=min(warmup, total_steps),
    decay_steps=max(total_steps, warmup + 1),
    end_value=opt_config.lr * opt_config.min_lr_ratio,
  )


def _decay_mask(params):
  """Weight decay on matrices only: norms' scales and other vectors are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
  opt_config, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optax chain from the `optimizer` config section."""
  schedule = learning_rate_schedule(opt_config, total_steps)
  parts = []
  if opt_config.clip_norm:
    parts.append(optax.clip_by_global_norm(opt_config.clip_norm))
  parts.append(
    optax.adamw(
      schedule,
      b1=opt_config.b1,
      b2=opt_config.b2,
      eps=opt_config.eps,
      weight_decay=opt_config.weight_decay,
      mask=_decay_mask,
    )
  )
  return optax.chain(*parts), schedule
