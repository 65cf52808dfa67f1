"""Expert parallelism: experts sharded over the mesh axis 'expert', tokens exchanged by all-to-all.

Inside `jax.shard_map` every device holds its own tokens (the flattened token axis is sharded over
the mesh's batch axes, 'expert' included) and E / n experts (n = size of 'expert'). A device
counting-sorts its selected (token, expert) pairs by expert (`dispatch.group_positions`), so the
pairs for each destination shard form one run; the devices then exchange counts first: one `pmax`
of the largest per-destination count picks C, the smallest of a few static buffer sizes that holds
it (`dispatch.bucketed`, the same buckets as the single-device layer), and only then the selected
rows go out in an `all_to_all` of [n, C] rows (with their local expert ids). The shard runs its
local experts on what it received (grouped matmuls over the received rows), a second `all_to_all`
brings the outputs back, and they are weighted and summed per token. Nothing is dropped, so the
result equals one device; traffic and compute follow the selected pairs, up to the bucket padding.

With dispatch='capacity' the buffer is fixed instead: C = ceil(capacity_factor * T_local * K / n)
rows per destination, and assignments past it are dropped (lowest routing weight first) and
counted.

`jax.lax.ragged_all_to_all` would send exactly the counted rows, but XLA:CPU does not lower it
(where the tests run) and a single-GPU machine cannot exercise it, so the bucketed all-to-all is
used on every backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from kuaijax.models import dispatch

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


def send_capacity(capacity_factor: float, tokens: int, slots: int, shards: int) -> int:
  """Rows per destination of the fixed-capacity exchange (dispatch='capacity')."""
  worst = tokens * slots
  return max(1, min(worst, math.ceil(capacity_factor * tokens * slots / shards)))


def _exchange(cap, x, weights, ids, slot, w1, w3, w2, *, shards, matmul):
  """Send the pairs at `slot` [T, K] (rows of an [n, cap] buffer), run local experts, bring back."""
  tokens, _ = ids.shape
  local_experts, d, _ = w1.shape
  size = shards * cap
  token, weight = dispatch.rows_of(size, slot, weights)
  eid = jnp.full((size,), local_experts, jnp.int32)  # empty rows keep the sentinel
  eid = eid.at[slot.reshape(-1)].set((ids % local_experts).reshape(-1), mode='drop')
  a2a = functools.partial(
    jax.lax.all_to_all, axis_name=AXIS, split_axis=0, concat_axis=0, tiled=True
  )
  recv_x = a2a(dispatch.gather_rows(x, token).reshape(shards, cap, d)).reshape(size, d)
  recv_eid = a2a(eid.reshape(shards, cap)).reshape(size, 1)
  sizes, positions = dispatch.group_positions(recv_eid, local_experts)
  ones = (recv_eid < local_experts).astype(jnp.float32)
  out = dispatch.ffn_rows(size, recv_x, ones, positions, sizes, w1, w3, w2, matmul)
  back = a2a(out.reshape(shards, cap, d)).reshape(size, d)
  return dispatch.combine_rows(back, token, weight, tokens, x.dtype)


def _local_ffn(x, weights, ids, w1, w3, w2, *, shards, capacity_factor, matmul, axes):
  """Per-device body: slots per destination, bucketed (or fixed) all-to-all, local experts, back."""
  tokens, slots = ids.shape
  local_experts = w1.shape[0]
  num_experts = shards * local_experts
  body = functools.partial(_exchange, shards=shards, matmul=matmul)
  if capacity_factor is not None:
    cap = send_capacity(capacity_factor, tokens, slots, shards)
    slot, _, dropped = dispatch.capacity_slots(
      (ids // local_experts).reshape(-1), weights.reshape(-1), shards, cap
    )
    y = body(cap, x, weights, ids, slot.reshape(tokens, slots), w1, w3, w2)
    return y, dropped
  sizes, positions = dispatch.group_positions(ids, num_experts)
  per_dest = sizes.reshape(shards, local_experts).sum(axis=1)
  dest_start = jnp.cumsum(per_dest) - per_dest
  dest = jnp.minimum(ids // local_experts, shards - 1)
  need = jax.lax.pmax(jnp.max(per_dest), axes)  # every device takes the same bucket

  def exchange(cap, x, weights, ids, positions, w1, w3, w2):
    slot = jnp.where(ids < num_experts, dest * cap + positions - dest_start[dest], shards * cap)
    return body(cap, x, weights, ids, slot, w1, w3, w2)

  buckets = dispatch.bucket_sizes(-(-tokens // shards), tokens * min(slots, local_experts))
  y = dispatch.bucketed(need, buckets, exchange, x, weights, ids, positions, w1, w3, w2)
  return y, jnp.zeros((), jnp.int32)


def expert_parallel_ffn(
  x,
  weights,
  ids,
  w1,
  w3,
  w2,
  *,
  mesh: Mesh,
  capacity: bool = False,
  capacity_factor: float = 1.25,
  gmm_implementation='auto',
  grouped_matmul=None,
  **_,
):
  """Routed expert outputs with experts sharded over `mesh`'s 'expert' axis.

  x [T, d], weights/ids [T, K] (global arrays, sentinel id E), w1/w3 [E, d, f], w2 [E, f, d].
  capacity: the fixed-capacity exchange (drops counted) instead of the exact bucketed one.
  Returns (y [T, d], dropped assignments summed over all devices).
  """
  shards = mesh.shape[AXIS]
  num_experts = w1.shape[0]
  if num_experts % shards:
    raise ValueError(
      f'num_experts={num_experts} is not divisible by the expert mesh axis size {shards}'
    )
  axes = token_axes(mesh, x.shape[0])
  tok = PartitionSpec(axes)
  exp = PartitionSpec(AXIS)
  matmul = dispatch.grouped_matmul(x.dtype, gmm_implementation, grouped_matmul)
  body = functools.partial(
    _local_ffn,
    shards=shards,
    capacity_factor=capacity_factor if capacity else None,
    matmul=matmul,
    axes=axes,
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
