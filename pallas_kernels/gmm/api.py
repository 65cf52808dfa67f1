"""Grouped matmul: `gmm(lhs[m,k], rhs[G,k,n], group_sizes[G]) -> [m,n]` and its weight gradient `tgmm`.

Rows of lhs are sorted by group: group g owns the next group_sizes[g] rows. Rows past sum(group_sizes) belong to
no group; their output rows are zero and so are their gradients. Products accumulate in float32; the output dtype
is `preferred_element_type` (default lhs.dtype). Both functions carry a `jax.custom_vjp`, so `jax.grad` (of any
order) works through every implementation:
  d lhs = gmm(d out, rhs^T),  d rhs = tgmm(lhs, d out)  for gmm;
  d lhs = gmm(grad, d out^T), d grad = gmm(lhs, d out)   for tgmm.

implementation: 'auto' (Pallas kernel on GPU/TPU, the XLA path elsewhere), 'xla' (tiled loop in plain XLA, the
fast path on CPU), 'pallas' (the kernel of the current backend), 'interpret' (the GPU kernel body run by the
Pallas interpreter on any backend; slow, for tests).
tiling: None (per-implementation defaults) or (tm, tk, tn) block sizes; the XLA path uses tm only.

Group sizes: concrete (non-traced) group_sizes are checked here (no negative entries, sum <= m). Traced ones
cannot be checked; the defined behaviour then is that a negative size counts as 0 and groups running past row m
are cut at m (see reference.group_bounds). Changing the values of traced group_sizes never recompiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import resolve_implementation
from pallas_kernels.gmm import xla


def _module(impl: str):
  if impl == 'xla':
    return xla
  if impl == 'tpu':
    from pallas_kernels.gmm import pallas_tpu

    return pallas_tpu
  from pallas_kernels.gmm import pallas_gpu  # 'gpu' and 'interpret'

  return pallas_gpu


def _kernel(impl: str, name: str, tiling, out_dtype):
  fn = getattr(_module(impl), name)
  return functools.partial(
    fn, preferred_element_type=out_dtype, tiling=tiling, interpret=impl == 'interpret'
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gmm(impl, out_dtype, tiling, lhs, rhs, group_sizes):
  return _kernel(impl, 'gmm', tiling, out_dtype)(lhs, rhs, group_sizes)


def _gmm_fwd(impl, out_dtype, tiling, lhs, rhs, group_sizes):
  return _gmm(impl, out_dtype, tiling, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd(impl, out_dtype, tiling, residuals, d_out):
  lhs, rhs, group_sizes = residuals
  d_lhs = _gmm(impl, lhs.dtype, tiling, d_out, jnp.swapaxes(rhs, 1, 2), group_sizes)
  d_rhs = _tgmm(impl, rhs.dtype, tiling, lhs, d_out, group_sizes)
  return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tgmm(impl, out_dtype, tiling, lhs, grad, group_sizes):
  return _kernel(impl, 'tgmm', tiling, out_dtype)(lhs, grad, group_sizes)


def _tgmm_fwd(impl, out_dtype, tiling, lhs, grad, group_sizes):
  return _tgmm(impl, out_dtype, tiling, lhs, grad, group_sizes), (lhs, grad, group_sizes)


def _tgmm_bwd(impl, out_dtype, tiling, residuals, d_out):
  lhs, grad, group_sizes = residuals
  d_lhs = _gmm(impl, lhs.dtype, tiling, grad, jnp.swapaxes(d_out, 1, 2), group_sizes)
  d_grad = _gmm(impl, grad.dtype, tiling, lhs, d_out, group_sizes)
  return d_lhs, d_grad, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _check_group_sizes(op: str, group_sizes, num_groups: int | None, m: int) -> None:
  if group_sizes.ndim != 1:
    raise ValueError(f'{op}: group_sizes must be 1-D [G], got shape {group_sizes.shape}')
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise TypeError(f'{op}: group_sizes must have an integer dtype, got {group_sizes.dtype}')
  if num_groups is not None and group_sizes.shape[0] != num_groups:
    raise ValueError(
      f'{op}: group_sizes has {group_sizes.shape[0]} entries but rhs has G={num_groups} groups'
    )
  if group_sizes.shape[0] == 0:
    raise ValueError(f'{op}: need at least one group, got group_sizes of shape {group_sizes.shape}')
  try:
    sizes = np.asarray(group_sizes).astype(np.int64)
  except jax.errors.TracerArrayConversionError:
    return  # Traced: negative sizes count as 0, groups past row m are cut (module docstring).
  if (sizes < 0).any():
    raise ValueError(f'{op}: group_sizes must be >= 0, got {sizes.tolist()}')
  if sizes.sum() > m:
    raise ValueError(f'{op}: sum(group_sizes) = {int(sizes.sum())} exceeds the {m} rows of lhs')


def _check_tiling(op: str, tiling):
  if tiling is None:
    return None
  tiling = tuple(tiling)
  if len(tiling) != 3 or not all(isinstance(t, int) and t > 0 for t in tiling):
    raise ValueError(f'{op}: tiling must be None or three positive ints (tm, tk, tn), got {tiling}')
  return tiling


def _out_dtype(preferred_element_type, default):
  return np.dtype(default if preferred_element_type is None else preferred_element_type)


def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
  implementation: str = 'auto',
  tiling=None,
) -> jax.Array:
  """out[r] = lhs[r] @ rhs[group(r)] -> [m, n]; zero rows past sum(group_sizes). See the module docstring."""
  impl = resolve_implementation(implementation, op='gmm')
  group_sizes = jnp.asarray(group_sizes)
  if lhs.ndim != 2 or rhs.ndim != 3:
    raise ValueError(
      f'gmm: need lhs [m, k] and rhs [G, k, n], got shapes {lhs.shape} and {rhs.shape}'
    )
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f'gmm: lhs k={lhs.shape[1]} does not match rhs k={rhs.shape[1]}')
  _check_group_sizes('gmm', group_sizes, rhs.shape[0], lhs.shape[0])
  tiling = _check_tiling('gmm', tiling)
  out_dtype = _out_dtype(preferred_element_type, lhs.dtype)
  return _gmm(impl, out_dtype, tiling, lhs, rhs, group_sizes.astype(jnp.int32))


def tgmm(
  lhs: jax.Array,
  grad: jax.Array,
  group_sizes: jax.Array,
  *,
  preferred_element_type=None,
  implementation: str = 'auto',
  tiling=None,
) -> jax.Array:
  """out[g] = lhs[rows of g]^T @ grad[rows of g] -> [G, k, n] (the gradient of gmm w.r.t. rhs)."""
  impl = resolve_implementation(implementation, op='tgmm')
  group_sizes = jnp.asarray(group_sizes)
  if lhs.ndim != 2 or grad.ndim != 2:
    raise ValueError(
      f'tgmm: need lhs [m, k] and grad [m, n], got shapes {lhs.shape} and {grad.shape}'
    )
  if lhs.shape[0] != grad.shape[0]:
    raise ValueError(f'tgmm: lhs has m={lhs.shape[0]} rows but grad has {grad.shape[0]}')
  _check_group_sizes('tgmm', group_sizes, None, lhs.shape[0])
  tiling = _check_tiling('tgmm', tiling)
  out_dtype = _out_dtype(preferred_element_type, lhs.dtype)
  return _tgmm(impl, out_dtype, tiling, lhs, grad, group_sizes.astype(jnp.int32))
