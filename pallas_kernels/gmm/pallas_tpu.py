"""Grouped matmul as Pallas Mosaic kernels (TPU), in the spirit of megablox; interpret=True runs them anywhere.

Rows are cut into fixed tiles of tm rows (lhs padded to a multiple of tm, k and n to multiples of their blocks
when larger than one block). The work list is every (row tile, group) pair where the group has rows in the tile,
in row order, at most tiles_m + G - 1 (+1 for the tail of unused rows) of them: a static grid bound, with the
real count and the pairs computed on device and passed by scalar prefetch, so new group sizes never recompile.
Padding entries past the real count repeat the last pair (same blocks, so no new DMA) and do nothing.

gmm, grid (n blocks, work items, k blocks): each item accumulates lhs_tile @ rhs[group] over k in a float32
scratch, then writes the rows of its group into the output tile, which stays resident in VMEM while consecutive
items share the row tile. The tail (rows past the last group) is a pseudo group that computes nothing and
keeps the zeros its tile starts from.
tgmm, grid (k blocks, n blocks, work items): each item adds lhs_tile^T @ grad_tile with rows outside the group
zeroed to a float32 scratch that is reset at a group's first item and stored at its last; an empty group gets
one item with no rows, so its output is zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gmm.reference import group_bounds

# (tm, tk, tn): rows per tile and the k / n blocks (multiples of 128 for the MXU; clipped to small shapes).
DEFAULT_TILING = (256, 512, 512)


def _round_up(x, multiple):
  return -(-x // multiple) * multiple


def _blocks(m, k, n, dtype, tiling):
  """Block sizes legal for Mosaic and the padded (m, k, n) they divide."""
  tm, tk, tn = DEFAULT_TILING if tiling is None else tiling
  sublanes = 8 * 4 // jnp.dtype(dtype).itemsize  # 8 rows of f32, 16 of bf16 per vreg
  tm = _round_up(min(tm, _round_up(m, sublanes)), sublanes)

  def lane_block(dim, block):  # one full-dim block, or multiples of 128 with the dim padded
    return (
      (dim, dim) if dim <= block else (_round_up(block, 128), _round_up(dim, _round_up(block, 128)))
    )

  (tk, k_pad), (tn, n_pad) = lane_block(k, tk), lane_block(n, tn)
  return (tm, tk, tn), (_round_up(m, tm), k_pad, n_pad)


def _pad(x, shape):
  return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def _tile_pairs(starts, ends, tm, bound, *, visit_empty):
  """(group_ids, tile_ids, count): the (group, row tile) pairs in row order, padded to `bound` entries."""
  nonempty = ends > starts
  first = starts // tm
  touched = jnp.where(nonempty, (jnp.maximum(ends, 1) - 1) // tm - first + 1, 0)
  if visit_empty:
    touched = jnp.maximum(touched, 1)
  cum = jnp.cumsum(touched)
  count = cum[-1]
  w = jnp.minimum(jnp.arange(bound, dtype=jnp.int32), count - 1)  # pads repeat the last real pair
  group_ids = jnp.minimum(jnp.searchsorted(cum, w, side='right'), starts.shape[0] - 1)
  tile_ids = first[group_ids] + w - (cum[group_ids] - touched[group_ids])
  return group_ids.astype(jnp.int32), tile_ids.astype(jnp.int32), count.astype(jnp.int32)


def _row_mask(shape, tile, lo, hi, tm):
  rows = tile * tm + lax.broadcasted_iota(jnp.int32, shape, 0)
  return (rows >= lo) & (rows < hi)


def _gmm_kernel(
  bounds_ref, gid_ref, tid_ref, count_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm, num_groups
):
  item, kb = pl.program_id(1), pl.program_id(2)
  group, tile = gid_ref[item], tid_ref[item]
  real = item < count_ref[0]

  @pl.when(kb == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(real & (group < num_groups))
  def _():
    acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[...], preferred_element_type=jnp.float32)

  @pl.when(real & (kb == pl.num_programs(2) - 1))
  def _():
    @pl.when((item == 0) | (tid_ref[jnp.maximum(item - 1, 0)] != tile))
    def _():  # first item on this output tile: start from zeros (the tail's rows stay so)
      out_ref[...] = jnp.zeros_like(out_ref)

    lo = bounds_ref[group]
    hi = jnp.where(group < num_groups, bounds_ref[group + 1], lo)  # the tail writes nothing
    mask = _row_mask(acc_ref.shape, tile, lo, hi, tm)
    previous = out_ref[...].astype(
      jnp.float32
    )  # select in f32: bf16 vector ops are not native everywhere
    out_ref[...] = jnp.where(mask, acc_ref[...], previous).astype(out_ref.dtype)


def gmm(lhs, rhs, group_sizes, *, preferred_element_type, tiling=None, interpret=False):
  """[m, n] = lhs[r] @ rhs[group(r)] per row, zero past the last group."""
  m, k = lhs.shape
  num_groups, _, n = rhs.shape
  if m == 0:
    return jnp.zeros((m, n), preferred_element_type)
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  (tm, tk, tn), (m_pad, k_pad, n_pad) = _blocks(m, k, n, dtype, tiling)
  lhs = _pad(lhs.astype(dtype), (m_pad, k_pad))
  rhs = _pad(rhs.astype(dtype), (num_groups, k_pad, n_pad))
  starts, ends = group_bounds(group_sizes, m)
  starts = jnp.append(
    starts, ends[-1]
  )  # the tail pseudo group: rows past the last group, padding included
  ends = jnp.append(ends, jnp.int32(m_pad))
  bounds = jnp.append(starts, jnp.int32(m_pad))
  bound = m_pad // tm + num_groups
  group_ids, tile_ids, count = _tile_pairs(starts, ends, tm, bound, visit_empty=False)

  def lhs_map(j, i, kb, bounds, gid, tid, count):
    return tid[i], kb

  def rhs_map(j, i, kb, bounds, gid, tid, count):
    return jnp.minimum(gid[i], num_groups - 1), kb, j

  def out_map(j, i, kb, bounds, gid, tid, count):
    return tid[i], j

  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=4,
    grid=(n_pad // tn, bound, k_pad // tk),
    in_specs=[
      pl.BlockSpec((tm, tk), lhs_map),
      pl.BlockSpec((pl.Squeezed(), tk, tn), rhs_map),
    ],
    out_specs=pl.BlockSpec((tm, tn), out_map),
    scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
  )
  out = pl.pallas_call(
    functools.partial(_gmm_kernel, tm=tm, num_groups=num_groups),
    out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), preferred_element_type),
    grid_spec=grid_spec,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=('parallel', 'arbitrary', 'arbitrary')
    ),
    interpret=interpret,
    name='gmm',
  )(bounds, group_ids, tile_ids, count[None], lhs, rhs)
  return out[:m, :n]


def _tgmm_kernel(
  bounds_ref, gid_ref, tid_ref, count_ref, lhs_ref, grad_ref, out_ref, acc_ref, *, tm
):
  item = pl.program_id(2)
  group, tile = gid_ref[item], tid_ref[item]
  count = count_ref[0]
  real = item < count
  first_of_group = (item == 0) | (gid_ref[jnp.maximum(item - 1, 0)] != group)
  last_of_group = (item == count - 1) | (gid_ref[jnp.minimum(item + 1, count - 1)] != group)

  @pl.when(real & first_of_group)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(real)
  def _():
    mask = _row_mask(lhs_ref.shape, tile, bounds_ref[group], bounds_ref[group + 1], tm)
    x = jnp.where(mask, lhs_ref[...].astype(jnp.float32), 0).astype(lhs_ref.dtype)  # select in f32
    contract_rows = (((0,), (0,)), ((), ()))
    acc_ref[...] += lax.dot_general(
      x, grad_ref[...], contract_rows, preferred_element_type=jnp.float32
    )

  @pl.when(real & last_of_group)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, grad, group_sizes, *, preferred_element_type, tiling=None, interpret=False):
  """[G, k, n] = per-group lhs_g^T @ grad_g (float32 accumulation)."""
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = group_sizes.shape[0]
  if m == 0:
    return jnp.zeros((num_groups, k, n), preferred_element_type)
  dtype = jnp.promote_types(lhs.dtype, grad.dtype)
  (tm, tk, tn), (m_pad, k_pad, n_pad) = _blocks(m, k, n, dtype, tiling)
  lhs = _pad(lhs.astype(dtype), (m_pad, k_pad))
  grad = _pad(grad.astype(dtype), (m_pad, n_pad))
  starts, ends = group_bounds(group_sizes, m)
  bounds = jnp.append(starts, ends[-1])
  bound = m_pad // tm + num_groups - 1
  group_ids, tile_ids, count = _tile_pairs(starts, ends, tm, bound, visit_empty=True)
  # An empty group at the very end starts at row m_pad: keep its (row-less) visit on the last tile.
  tile_ids = jnp.minimum(tile_ids, m_pad // tm - 1)

  def lhs_map(a, b, i, bounds, gid, tid, count):
    return tid[i], a

  def grad_map(a, b, i, bounds, gid, tid, count):
    return tid[i], b

  def out_map(a, b, i, bounds, gid, tid, count):
    return gid[i], a, b

  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=4,
    grid=(k_pad // tk, n_pad // tn, bound),
    in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
    out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), out_map),
    scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
  )
  out = pl.pallas_call(
    functools.partial(_tgmm_kernel, tm=tm),
    out_shape=jax.ShapeDtypeStruct((num_groups, k_pad, n_pad), preferred_element_type),
    grid_spec=grid_spec,
    compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
    interpret=interpret,
    name='tgmm',
  )(bounds, group_ids, tile_ids, count[None], lhs, grad)
  return out[:, :k, :n]
