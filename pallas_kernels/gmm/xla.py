"""Grouped matmul in plain XLA, fast on XLA:CPU.

Rows are sorted by group, so each group is a contiguous run of rows, cut into row tiles that start inside the
group (a tile never serves two groups). Each group takes as many full tiles of tm rows as fit, then the binary
digits of what is left: at most one tile each of tm/2, tm/4, ..., min_tm rows, and one last tile of min_tm rows
for the final < min_tm rows. So every matmul except the last per group is full, and the wasted work is under
min_tm rows per group (instead of up to a whole tile). The (group, tile) items of each tile size are enumerated
on device (static bounds: m // tm for the full tiles, G for each smaller size) and a while loop per tile size does
one [tile, k] x [k, n] matmul per item, writing only the item's rows. The loops run exactly as many items as the
group sizes need, and new group sizes never recompile. A tile near the end of lhs is shifted back to fit
(dynamic_slice clamps); rows outside the item are masked off, so they keep what other items wrote.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gmm.reference import group_bounds

# Rows per full tile and the smallest tile on CPU. At m=16384, k=512, n=1024, G=8 (one compute thread, CPU
# time) full tiles of 128, 256 and 512 rows ran within noise of each other and of the dense matmul; the small
# tiles cut the waste of partial tiles, which dominated at small m (see bench.py).
DEFAULT_TILE_M = 256
MIN_TILE_M = 32


def _enumerate(counts, first_start, ends, tile, bound):
  """(item_group, item_start, item_end, num_items): counts[g] tiles of `tile` rows from first_start[g]."""
  num_groups = counts.shape[0]
  cum = jnp.cumsum(counts)
  w = jnp.arange(bound, dtype=jnp.int32)
  item_group = jnp.minimum(jnp.searchsorted(cum, w, side='right'), num_groups - 1).astype(jnp.int32)
  first = cum[item_group] - counts[item_group]
  item_start = first_start[item_group] + (w - first) * tile
  return item_group, item_start, ends[item_group], cum[-1]


def work_items(group_sizes: jax.Array, m: int, tm: int, *, tail: bool = False):
  """Group-aligned tiles of tm rows: (item_group, item_start, item_end, num_items), static length W.

  Item i covers rows [item_start[i], min(item_start[i] + tm, item_end[i])) of group item_group[i]; only the first
  num_items (traced) entries are real. With tail=True the rows past the last group form an extra group G, so the
  items cover every row exactly once (kernels that must write each output row use it).
  """
  starts, ends = group_bounds(group_sizes, m)
  if tail:
    starts = jnp.append(starts, ends[-1])
    ends = jnp.append(ends, jnp.int32(m))
  counts = (ends - starts + tm - 1) // tm
  return _enumerate(counts, starts, ends, tm, -(-m // tm) + starts.shape[0] - 1)


def tile_sizes(m: int, tm: int, min_tm: int) -> list[int]:
  """Row tiles of an m-row buffer: tm, then halving while >= min_tm (none larger than m)."""
  sizes = [tm]
  while sizes[-1] // 2 >= min_tm:
    sizes.append(sizes[-1] // 2)
  return [s for s in sizes if s <= m] or [m]


def tile_levels(group_sizes: jax.Array, m: int, tm: int, min_tm: int):
  """[(tile_rows, work items)] for the full tiles, each binary digit of the remainder, and the last rows."""
  starts, ends = group_bounds(group_sizes, m)
  num_groups = starts.shape[0]
  sizes = tile_sizes(m, tm, min_tm)
  full = (ends - starts) // sizes[0]
  levels = [(sizes[0], _enumerate(full, starts, ends, sizes[0], m // sizes[0]))]
  offset = starts + full * sizes[0]
  for tile in sizes[1:]:
    take = (ends - offset >= tile).astype(jnp.int32)
    levels.append((tile, _enumerate(take, offset, ends, tile, num_groups)))
    offset = offset + take * tile
  last = (ends > offset).astype(jnp.int32)
  levels.append((sizes[-1], _enumerate(last, offset, ends, sizes[-1], num_groups)))
  return levels


def _tiles(m, tiling):
  tm = DEFAULT_TILE_M if tiling is None else tiling[0]
  return max(1, min(tm, m)), min(MIN_TILE_M, tm)


def _as_compute_dtype(a, b):
  """Both operands in (at least) float32, materialised once before the loops.

  XLA:CPU runs bf16 x bf16 -> f32 dots inside a loop slower than f32 dots (measured 167 vs 130 ms at the MoE
  shape); the products are exact in f32 either way, so the numerics are those of f32 accumulation.
  """
  dtype = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
  return lax.optimization_barrier((a.astype(dtype), b.astype(dtype)))


def _row_slab(x, row0, tile):
  return lax.dynamic_slice_in_dim(x, row0, tile, 0)


def gmm(lhs, rhs, group_sizes, *, preferred_element_type, tiling=None, interpret=False):
  """[m, n] = lhs[r] @ rhs[group(r)] per row; see the module docstring."""
  del interpret
  m, _ = lhs.shape
  n = rhs.shape[2]
  # The output stays f32 inside the loops (bf16 selects are 2x slower on XLA:CPU) and is cast once.
  out = jnp.zeros((m, n), jnp.float32)
  if m == 0:
    return out.astype(preferred_element_type)
  lhs, rhs = _as_compute_dtype(lhs, rhs)
  for tile, (item_group, item_start, item_end, num_items) in tile_levels(
    group_sizes, m, *_tiles(m, tiling)
  ):

    def body(i, out, tile=tile, item_group=item_group, item_start=item_start, item_end=item_end):
      start, end = item_start[i], item_end[i]
      row0 = jnp.minimum(start, m - tile)
      w = lax.dynamic_index_in_dim(rhs, item_group[i], 0, keepdims=False)
      y = jnp.dot(_row_slab(lhs, row0, tile), w, preferred_element_type=jnp.float32)
      rows = row0 + jnp.arange(tile, dtype=jnp.int32)
      keep = ((rows >= start) & (rows < end))[:, None]
      y = jnp.where(keep, y, _row_slab(out, row0, tile))
      return lax.dynamic_update_slice_in_dim(out, y, row0, 0)

    out = lax.fori_loop(0, num_items, body, out)
  return out.astype(preferred_element_type)


def tgmm(lhs, grad, group_sizes, *, preferred_element_type, tiling=None, interpret=False):
  """[G, k, n] = per-group lhs_g^T @ grad_g (f32 accumulation)."""
  del interpret
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = group_sizes.shape[0]
  out = jnp.zeros((num_groups, k, n), jnp.float32)
  if m == 0:
    return out.astype(preferred_element_type)
  lhs, grad = _as_compute_dtype(lhs, grad)
  contract_rows = (((0,), (0,)), ((), ()))
  for tile, (item_group, item_start, item_end, num_items) in tile_levels(
    group_sizes, m, *_tiles(m, tiling)
  ):

    def body(i, out, tile=tile, item_group=item_group, item_start=item_start, item_end=item_end):
      start, end, g = item_start[i], item_end[i], item_group[i]
      row0 = jnp.minimum(start, m - tile)
      rows = row0 + jnp.arange(tile, dtype=jnp.int32)
      keep = ((rows >= start) & (rows < end))[:, None]
      x = jnp.where(keep, _row_slab(lhs, row0, tile), 0)
      acc = lax.dot_general(
        x, _row_slab(grad, row0, tile), contract_rows, preferred_element_type=jnp.float32
      )
      old = lax.dynamic_index_in_dim(out, g, 0, keepdims=True)
      return lax.dynamic_update_index_in_dim(out, old + acc[None], g, 0)

    out = lax.fori_loop(0, num_items, body, out)
  return out.astype(preferred_element_type)
