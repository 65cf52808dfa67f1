"""Grouped matmul as Pallas kernels for the Triton lowering (GPU); with interpret=True they run on any backend.

gmm: one program per (row tile, column block). Row tiles are group-aligned (xla.work_items with the tail group):
each starts at a row of its group, covers at most tm rows of it, and rows past the last group form a tail
"group" whose tiles store zeros. The tile schedule is computed on device, so the grid is static (the bound
cdiv(m, tm) + G) and programs past the real item count do nothing: new group sizes never recompile. Loads and
stores are masked, so groups smaller than a tile and m, k, n that are not multiples of the blocks need no padding.

tgmm: one program per (group, k block, n block) looping over the group's rows in tm steps, accumulating
lhs_tile^T @ grad_tile in float32; an empty group stores zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gmm.reference import group_bounds
from pallas_kernels.gmm.xla import work_items

# (tm, tk, tn) and Triton launch parameters; typical Hopper/Ampere matmul blocks (not tuned on hardware here).
DEFAULT_TILING = (64, 64, 128)
NUM_WARPS = 4
NUM_STAGES = 3


def _cdiv(a, b):
  return -(-a // b)


def _tiling(tiling, interpret):
  tiling = DEFAULT_TILING if tiling is None else tiling
  if not interpret and any(t < 16 or t & (t - 1) for t in tiling):
    raise ValueError(f'gmm (Triton): tiling blocks must be powers of two >= 16, got {tiling}')
  return tiling


def _gmm_kernel(
  group_ref, start_ref, end_ref, count_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, num_groups
):
  k, n = rhs_ref.shape[1], rhs_ref.shape[2]
  item, col_block = pl.program_id(0), pl.program_id(1)
  group, start, end = group_ref[item], start_ref[item], end_ref[item]
  row_ok = start + jnp.arange(tm) < end
  col0 = col_block * tn
  col_ok = col0 + jnp.arange(tn) < n
  out_mask = row_ok[:, None] & col_ok[None, :]
  out_tile = out_ref.at[pl.ds(start, tm), pl.ds(col0, tn)]

  @pl.when((item < count_ref[0]) & (group < num_groups))
  def _():
    def body(kb, acc):
      k0 = kb * tk
      k_ok = k0 + jnp.arange(tk) < k
      x = plgpu.load(
        lhs_ref.at[pl.ds(start, tm), pl.ds(k0, tk)], mask=row_ok[:, None] & k_ok[None, :], other=0
      )
      w = plgpu.load(
        rhs_ref.at[group, pl.ds(k0, tk), pl.ds(col0, tn)],
        mask=k_ok[:, None] & col_ok[None, :],
        other=0,
      )
      return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, _cdiv(k, tk), body, jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(out_tile, acc.astype(out_ref.dtype), mask=out_mask)

  @pl.when((item < count_ref[0]) & (group == num_groups))
  def _():
    plgpu.store(out_tile, jnp.zeros((tm, tn), out_ref.dtype), mask=out_mask)


def gmm(lhs, rhs, group_sizes, *, preferred_element_type, tiling=None, interpret=False):
  """[m, n] = lhs[r] @ rhs[group(r)] per row, zero past the last group."""
  m, _ = lhs.shape
  num_groups, _, n = rhs.shape
  if m == 0:
    return jnp.zeros((m, n), preferred_element_type)
  tm, tk, tn = _tiling(tiling, interpret)
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  item_group, item_start, item_end, count = work_items(group_sizes, m, tm, tail=True)
  kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, num_groups=num_groups)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((m, n), preferred_element_type),
    grid=(item_group.shape[0], _cdiv(n, tn)),
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
    interpret=interpret,
    name='gmm',
  )(item_group, item_start, item_end, count[None], lhs.astype(dtype), rhs.astype(dtype))


def _tgmm_kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref, *, tm, tk, tn):
  k, n = lhs_ref.shape[1], grad_ref.shape[1]
  group, k_block, n_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = start_ref[group], end_ref[group]
  k0, n0 = k_block * tk, n_block * tn
  k_ok = k0 + jnp.arange(tk) < k
  n_ok = n0 + jnp.arange(tn) < n

  def body(step, acc):
    row0 = start + step * tm
    row_ok = row0 + jnp.arange(tm) < end
    x = plgpu.load(
      lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)], mask=row_ok[:, None] & k_ok[None, :], other=0
    )
    dy = plgpu.load(
      grad_ref.at[pl.ds(row0, tm), pl.ds(n0, tn)], mask=row_ok[:, None] & n_ok[None, :], other=0
    )
    contract_rows = (((0,), (0,)), ((), ()))
    return acc + lax.dot_general(x, dy, contract_rows, preferred_element_type=jnp.float32)

  steps = (end - start + tm - 1) // tm
  acc = lax.fori_loop(0, steps, body, jnp.zeros((tk, tn), jnp.float32))
  plgpu.store(
    out_ref.at[group, pl.ds(k0, tk), pl.ds(n0, tn)],
    acc.astype(out_ref.dtype),
    mask=k_ok[:, None] & n_ok[None, :],
  )


def tgmm(lhs, grad, group_sizes, *, preferred_element_type, tiling=None, interpret=False):
  """[G, k, n] = per-group lhs_g^T @ grad_g (float32 accumulation)."""
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = group_sizes.shape[0]
  if m == 0:
    return jnp.zeros((num_groups, k, n), preferred_element_type)
  tm, tk, tn = _tiling(tiling, interpret)
  dtype = jnp.promote_types(lhs.dtype, grad.dtype)
  starts, ends = group_bounds(group_sizes, m)
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn)
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((num_groups, k, n), preferred_element_type),
    grid=(num_groups, _cdiv(k, tk), _cdiv(n, tn)),
    compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
    interpret=interpret,
    name='tgmm',
  )(starts, ends, lhs.astype(dtype), grad.astype(dtype))
