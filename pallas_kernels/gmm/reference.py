"""Pure-jnp grouped matmul: the ground truth every implementation is tested against.

Rows of `lhs` are sorted by group: group g owns rows [ends[g] - sizes[g], ends[g]). Rows past the last group
(past sum(group_sizes)) belong to no group: their output rows are zero and they add nothing to `tgmm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_bounds(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(starts[G], ends[G]) int32 row bounds of each group, clipped to [0, m].

  Concrete group sizes are validated in api.py; for traced ones this is the defined behaviour: a negative size
  counts as 0 and groups that run past row m are cut at m.
  """
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def group_masks(group_sizes: jax.Array, m: int) -> jax.Array:
  """[G, m] bool: row r belongs to group g."""
  starts, ends = group_bounds(group_sizes, m)
  rows = jnp.arange(m, dtype=jnp.int32)
  return (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None):
  """out[r] = lhs[r] @ rhs[group(r)] (zero for rows past the last group); one masked dense matmul per group."""
  out_dtype = preferred_element_type or lhs.dtype
  masks = group_masks(group_sizes, lhs.shape[0])
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  for g in range(rhs.shape[0]):
    y = jnp.dot(
      lhs, rhs[g], preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    out = jnp.where(masks[g][:, None], y, out)
  return out.astype(out_dtype)


def tgmm(lhs, grad, group_sizes, *, preferred_element_type=None):
  """out[g] = lhs[rows of g]^T @ grad[rows of g], shape [G, k, n]."""
  out_dtype = preferred_element_type or lhs.dtype
  masks = group_masks(group_sizes, lhs.shape[0])
  outs = []
  for g in range(group_sizes.shape[0]):
    x = jnp.where(masks[g][:, None], lhs, 0).astype(lhs.dtype)
    outs.append(
      jnp.dot(x.T, grad, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    )
  return jnp.stack(outs).astype(out_dtype)
