"""Pallas TPU (Mosaic) router kernel: a parallel grid over token blocks.

Blocks span the whole d and E axes (full-dimension blocks satisfy Mosaic's tiling rule for any E
and d), so only tokens are padded; the body is the GPU kernel's (`xla.route_block`). Per-block
expert counts go to a [blocks, 1, E] output summed outside. `interpret` runs it with the TPU
interpreter on any backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.topp_router.xla import F32, route_block

BLOCK_T = 256


def _kernel(x_ref, w_ref, wts_ref, ids_ref, cnt_ref, logit_ref, *, p, t, k_max):
  block_t = x_ref.shape[0]
  z = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=F32)
  rows = pl.program_id(0) * block_t + jax.lax.broadcasted_iota(jnp.int32, (block_t, 1), 0)
  weights, ids, counts = route_block(
    z, rows < t, p=p, k_slots=k_max, k_counted=k_max, num_experts=w_ref.shape[1]
  )
  wts_ref[...] = weights
  ids_ref[...] = ids
  cnt_ref[...] = counts
  logit_ref[...] = z


def forward(x, router_w, *, p: float, k_max: int, interpret: bool = False):
  """(weights[T, k_max], ids[T, k_max], counts[E], logits[T, E]) for x [T, d], router_w [d, E]."""
  t, d = x.shape
  e = router_w.shape[1]
  block_t = min(BLOCK_T, pl.cdiv(t, 8) * 8)
  t_pad = pl.cdiv(t, block_t) * block_t
  dtype = jnp.promote_types(x.dtype, router_w.dtype)
  xp = jnp.pad(x.astype(dtype), [(0, t_pad - t), (0, 0)])
  nb = t_pad // block_t
  if interpret:
    params = dict(interpret=pltpu.InterpretParams())
  else:
    params = dict(compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel',)))
  weights, ids, counts, logits = pl.pallas_call(
    functools.partial(_kernel, p=p, t=t, k_max=k_max),
    grid=(nb,),
    in_specs=[
      pl.BlockSpec((block_t, d), lambda i: (i, 0)),
      pl.BlockSpec((d, e), lambda i: (0, 0)),
    ],
    out_specs=[
      pl.BlockSpec((block_t, k_max), lambda i: (i, 0)),
      pl.BlockSpec((block_t, k_max), lambda i: (i, 0)),
      pl.BlockSpec((None, 1, e), lambda i: (i, 0, 0)),
      pl.BlockSpec((block_t, e), lambda i: (i, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((t_pad, k_max), F32),
      jax.ShapeDtypeStruct((t_pad, k_max), jnp.int32),
      jax.ShapeDtypeStruct((nb, 1, e), jnp.int32),
      jax.ShapeDtypeStruct((t_pad, e), F32),
    ],
    **params,
  )(xp, router_w.astype(dtype))
  return weights[:t], ids[:t], counts.sum((0, 1)), logits[:t]
