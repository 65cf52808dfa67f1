"""Pallas GPU (Triton lowering) router kernel; with interpret=True the same body runs on any backend.

A grid over token blocks. Each program accumulates its logits block over d in chunks (one
tl.dot per chunk), takes a float32 softmax with padded expert columns masked out, selects the Top-P
slots by repeated max (`xla.select_slots`, the exclusive cumulative sum carried along), and writes
weights, ids, logits and its block's per-expert counts (summed outside: no atomics). Triton blocks
need power-of-two dims >= 16 for dot, so d, E and the slot axis are zero-padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.topp_router.xla import F32, route_block

BLOCK_T = 64
BLOCK_D = 128


def _pow2_at_least(n: int, low: int = 1) -> int:
  return max(low, 1 << max(n - 1, 0).bit_length())


def _pad(x, shape):
  return jnp.pad(x, [(0, s - n) for s, n in zip(shape, x.shape)])


def _kernel(x_ref, w_ref, wts_ref, ids_ref, cnt_ref, logit_ref, *, p, t, e, k_max, block_d):
  block_t, d_pad = x_ref.shape
  e_pad = w_ref.shape[1]

  def body(j, acc):
    start = pl.multiple_of(j * block_d, block_d)
    xs = x_ref[:, pl.ds(start, block_d)]
    ws = w_ref[pl.ds(start, block_d), :]
    return acc + jnp.dot(xs, ws, preferred_element_type=F32)

  z = jax.lax.fori_loop(0, d_pad // block_d, body, jnp.zeros((block_t, e_pad), F32))
  rows = pl.program_id(0) * block_t + jax.lax.broadcasted_iota(jnp.int32, (block_t, 1), 0)
  weights, ids, counts = route_block(
    z, rows < t, p=p, k_slots=wts_ref.shape[1], k_counted=k_max, num_experts=e
  )
  wts_ref[...] = weights
  ids_ref[...] = ids
  cnt_ref[...] = counts
  logit_ref[...] = z


def forward(x, router_w, *, p: float, k_max: int, interpret: bool = False):
  """(weights[T, k_max], ids[T, k_max], counts[E], logits[T, E]) for x [T, d], router_w [d, E]."""
  t, d = x.shape
  e = router_w.shape[1]
  block_t = min(BLOCK_T, _pow2_at_least(t, 16))
  block_d = min(BLOCK_D, _pow2_at_least(d, 16))
  t_pad = pl.cdiv(t, block_t) * block_t
  d_pad = pl.cdiv(d, block_d) * block_d
  e_pad, k_pad = _pow2_at_least(e, 16), _pow2_at_least(k_max)
  dtype = jnp.promote_types(x.dtype, router_w.dtype)
  xp = _pad(x.astype(dtype), (t_pad, d_pad))
  wp = _pad(router_w.astype(dtype), (d_pad, e_pad))
  nb = t_pad // block_t
  kernel = functools.partial(_kernel, p=p, t=t, e=e, k_max=k_max, block_d=block_d)
  weights, ids, counts, logits = pl.pallas_call(
    kernel,
    grid=(nb,),
    in_specs=[
      pl.BlockSpec((block_t, d_pad), lambda i: (i, 0)),
      pl.BlockSpec((d_pad, e_pad), lambda i: (0, 0)),
    ],
    out_specs=[
      pl.BlockSpec((block_t, k_pad), lambda i: (i, 0)),
      pl.BlockSpec((block_t, k_pad), lambda i: (i, 0)),
      pl.BlockSpec((None, 1, e_pad), lambda i: (i, 0, 0)),
      pl.BlockSpec((block_t, e_pad), lambda i: (i, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((t_pad, k_pad), F32),
      jax.ShapeDtypeStruct((t_pad, k_pad), jnp.int32),
      jax.ShapeDtypeStruct((nb, 1, e_pad), jnp.int32),
      jax.ShapeDtypeStruct((t_pad, e_pad), F32),
    ],
    interpret=interpret,
    compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
  )(xp, wp)
  return weights[:t, :k_max], ids[:t, :k_max], counts.sum((0, 1))[:e], logits[:t, :e]
