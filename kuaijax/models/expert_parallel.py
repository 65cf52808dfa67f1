"""Expert parallelism: experts sharded over the mesh axis 'expert', tokens exchanged by all-to-all.

Inside `jax.shard_map` every device holds its own tokens (the flattened token axis is sharded over
the mesh's batch axes, 'expert' included) and E / n experts (n = size of 'expert'). A device sends
each kept (token, slot) assignment to the shard owning its expert through a fixed-capacity
`all_to_all` buffer of C rows per destination, the shard runs its local experts on what it received
(any single-device dispatch strategy, one routing slot per row), and a second `all_to_all` brings
the outputs back, where they are weighted by the routing weights and summed per token.

C defaults to the worst case (T_local * min(K, E / n) rows: nothing can be dropped, the result is
exact); a `capacity_factor` sizes it to ceil(capacity_factor * T_local * K / n) instead, and
assignments past the capacity are dropped (lowest routing weight first) and counted. Only the
fixed-capacity all-to-all is used: `jax.lax.ragged_all_to_all` is not lowered by XLA:CPU, where the
tests run.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

BATCH_AXES = ('data', 'fsdp', 'expert')
AXIS = 'expert'


def token_axes(mesh: Mesh, tokens: int) -> tuple[str, ...]:
  """Mesh axes the flattened token axis is sharded over (those of size > 1, 'expert' included)."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape and mesh.shape[a] > 1)
  size = math.prod(mesh.shape[a] for a in axes)
  if tokens % size:
    raise ValueError(
      f'expert parallelism: {tokens} tokens cannot be split over mesh axes {axes} '
      f'({size} shards); make batch * length divisible by {size}'
    )
  return axes


def send_capacity(capacity_factor, tokens: int, slots: int, shards: int, local_experts: int) -> int:
  """Rows per destination shard in the all-to-all buffer (worst case when capacity_factor is None)."""
  worst = tokens * min(slots, local_experts)
  if capacity_factor is None:
    return worst
  return max(1, min(worst, math.ceil(capacity_factor * tokens * slots / shards)))


def _local_ffn(x, weights, ids, w1, w3, w2, *, shards, capacity_factor, local_dispatch, options):
  """Per-device body: route rows to shards, all-to-all, local experts, all-to-all back, combine."""
  from kuaijax.models.moe import STRATEGIES

  tokens, slots = ids.shape
  local_experts, d, _ = w1.shape
  cap = send_capacity(capacity_factor, tokens, slots, shards, local_experts)
  flat, flat_w = ids.reshape(-1), weights.reshape(-1)
  dest = flat // local_experts  # the sentinel id E maps to shard n: nowhere
  # Per destination, highest routing weight first, so a full buffer drops the lightest assignments.
  order = jnp.lexsort((-jax.lax.stop_gradient(flat_w), dest)).astype(jnp.int32)
  sizes = jnp.zeros((shards,), jnp.int32).at[dest].add(1, mode='drop')
  starts = jnp.cumsum(sizes) - sizes
  rank_sorted = (
    jnp.arange(flat.shape[0], dtype=jnp.int32) - starts[jnp.minimum(dest[order], shards - 1)]
  )
  rank = jnp.zeros_like(order).at[order].set(rank_sorted)
  valid = dest < shards
  keep = valid & (rank < cap)
  slot_pos = jnp.where(keep, dest * cap + rank, shards * cap)
  assignment = jnp.arange(flat.shape[0], dtype=jnp.int32)
  send_token = (
    jnp.full((shards * cap,), tokens, jnp.int32).at[slot_pos].set(assignment // slots, mode='drop')
  )
  send_eid = (
    jnp.full((shards * cap,), local_experts, jnp.int32)
    .at[slot_pos]
    .set(flat % local_experts, mode='drop')
  )
  send_x = jnp.take(x, send_token, axis=0, mode='fill', fill_value=0).reshape(shards, cap, d)
  a2a = functools.partial(
    jax.lax.all_to_all, axis_name=AXIS, split_axis=0, concat_axis=0, tiled=True
  )
  recv_x = a2a(send_x).reshape(shards * cap, d)
  recv_eid = a2a(send_eid.reshape(shards, cap)).reshape(shards * cap, 1)
  ones = (recv_eid < local_experts).astype(jnp.float32)
  out, _ = STRATEGIES[local_dispatch](
    recv_x, ones, recv_eid, w1, w3, w2, capacity_factor=None, **options
  )
  back = a2a(out.reshape(shards, cap, d)).reshape(shards * cap, d)
  out_slots = jnp.take(back, slot_pos, axis=0, mode='fill', fill_value=0).reshape(tokens, slots, d)
  y = jnp.sum(weights[:, :, None] * out_slots.astype(jnp.float32), axis=1).astype(x.dtype)
  dropped = jnp.sum(valid & ~keep).astype(jnp.int32)
  return y, dropped


def expert_parallel_ffn(
  x,
  weights,
  ids,
  w1,
  w3,
  w2,
  *,
  mesh: Mesh,
  local_dispatch: str,
  capacity_factor=None,
  gmm_implementation='auto',
  grouped_matmul=None,
):
  """Routed expert outputs with experts sharded over `mesh`'s 'expert' axis.

  x [T, d], weights/ids [T, K] (global arrays, sentinel id E), w1/w3 [E, d, f], w2 [E, f, d].
  Returns (y [T, d], dropped assignments summed over all devices).
  """
  shards = mesh.shape[AXIS]
  num_experts = w1.shape[0]
  if num_experts % shards:
    raise ValueError(
      f'num_experts={num_experts} is not divisible by the expert mesh axis size {shards}'
    )
  if local_dispatch == 'capacity':
    local_dispatch = 'dropless'  # the all-to-all buffer is the capacity; locally nothing drops
  axes = token_axes(mesh, x.shape[0])
  tok = PartitionSpec(axes)
  exp = PartitionSpec(AXIS)
  body = functools.partial(
    _local_ffn,
    shards=shards,
    capacity_factor=capacity_factor,
    local_dispatch=local_dispatch,
    options=dict(gmm_implementation=gmm_implementation, grouped_matmul=grouped_matmul),
  )

  def wrapped(x, weights, ids, w1, w3, w2):
    y, dropped = body(x, weights, ids, w1, w3, w2)
    return y, jax.lax.psum(dropped, axes)

  return jax.shard_map(
    wrapped,
    mesh=mesh,
    in_specs=(tok, tok, tok, exp, exp, exp),
    out_specs=(tok, PartitionSpec()),
    # The local strategies' loops (pallas_kernels.gmm's XLA path) start from replicated zeros, which
    # the varying-manual-axes check rejects; outputs and gradients are checked against 1 device.
    check_vma=False,
  )(x, weights, ids, w1, w3, w2)
