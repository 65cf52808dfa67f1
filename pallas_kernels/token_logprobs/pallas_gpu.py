"""Pallas GPU (Triton lowering) kernels; with interpret=True the same bodies run on any backend.

Forward: a grid over token blocks; each program loops over vocabulary blocks, keeping only the
running (max, sum exp, sum exp * logit, target logit) per token. Backward: two kernels that each
recompute their logit blocks (as flash attention's backward does): one over token blocks looping
over the vocabulary for d hidden, one over vocabulary blocks looping over tokens for d lm_head.
Inputs are zero-padded to whole blocks (d to a power of two, as Triton blocks need); padded
vocabulary columns are masked out, padded tokens get zero cotangents.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.token_logprobs import xla
from pallas_kernels.token_logprobs.xla import F32, NN, NT, TN


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


# Shared memory for one program's operand tiles. H100/H200 allow 227 KiB per block; Triton stages
# the token tile [block_t, d] and the vocabulary tile [d, block_v] there (an H200 run at d=512 f32
# with blocks (32, 128) asked for exactly (32 + 128) * 512 * 4 = 327680 bytes and failed), and needs
# some more for its own conversions, hence the margin.
SMEM_BUDGET = 180 * 1024


def tile_bytes(block_t: int, block_v: int, d: int, itemsize: int) -> int:
  """Shared memory the operand tiles of one program take (d padded to a power of two)."""
  return (block_t + block_v) * _pow2_at_least(d) * itemsize


def choose_blocks(t: int, d: int, itemsize: int, block_v: int | None) -> tuple[int, int] | None:
  """(token block, vocabulary block) whose tiles fit `SMEM_BUDGET`, or None when none does.

  Starts from (64, 128) and halves the larger block (a `block_v` given as chunk_size is kept)
  down to 16, the smallest `tl.dot` dimension.
  """
  if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
    raise ValueError(f'token_logprobs (gpu): chunk_size={block_v} must be a power of two >= 16')
  fixed_v = block_v is not None
  block_t = max(16, min(64, _pow2_at_least(t)))
  block_v = block_v or 128
  while tile_bytes(block_t, block_v, d, itemsize) > SMEM_BUDGET:
    if not fixed_v and block_v > 16 and block_v >= block_t:
      block_v //= 2
    elif block_t > 16:
      block_t //= 2
    else:
      return None
  return block_t, block_v


def fits(d: int, itemsize: int, block_v: int | None = None) -> bool:
  """Whether the kernels can run at this width and operand size (else use the XLA path)."""
  return choose_blocks(16, d, itemsize, block_v) is not None


def _pad_to(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


def _prepare(hidden, lm_head, vectors, block_v):
  """Pads hidden [T, d], lm_head [d, V] and per-token vectors to whole blocks."""
  t, d = hidden.shape
  v = lm_head.shape[1]
  blocks = choose_blocks(t, d, jnp.dtype(hidden.dtype).itemsize, block_v)
  if blocks is None:
    raise ValueError(
      f'token_logprobs (gpu): d={d} in {jnp.dtype(hidden.dtype).name} needs more than '
      f'{SMEM_BUDGET} bytes of shared memory even with 16 x 16 blocks; use implementation="xla" '
      '(implementation="auto" does)'
    )
  block_t, block_v = blocks
  tp, dp, vp = pl.cdiv(t, block_t) * block_t, _pow2_at_least(d), pl.cdiv(v, block_v) * block_v
  hidden = _pad_to(_pad_to(hidden, 0, tp), 1, dp)
  lm_head = _pad_to(_pad_to(lm_head, 0, dp), 1, vp)
  vectors = [_pad_to(x, 0, tp) for x in vectors]
  return hidden, lm_head, vectors, block_t, block_v


def _params(interpret: bool):
  return dict(
    interpret=interpret,
    compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=2),
  )


def _block_logits(h, w, cols, v, temperature, soft_cap):
  z = lax.dot_general(h, w, NN, preferred_element_type=F32)
  lg, dl_dz = xla.logits_of(z, temperature, soft_cap)
  return lg, dl_dz, (cols < v) if v % w.shape[1] else None


def _fwd_kernel(h_ref, w_ref, y_ref, lp_ref, ent_ref, lse_ref, mean_ref, *, v, block_v, **opts):
  h, y = h_ref[...], y_ref[...]
  local = lax.broadcasted_iota(jnp.int32, (h.shape[0], block_v), 1)

  def body(j, stats):
    start = pl.multiple_of(j * block_v, block_v)
    lg, _, valid = _block_logits(h, w_ref[:, pl.ds(start, block_v)], start + local, v, **opts)
    return xla.online_update(stats, lg, start + local, y, valid)

  stats = lax.fori_loop(0, w_ref.shape[1] // block_v, body, xla.init_stats(y.shape))
  lp_ref[...], ent_ref[...], lse_ref[...], mean_ref[...] = xla.finalize(stats)


def _dh_kernel(
  h_ref, w_ref, y_ref, lse_ref, mean_ref, glp_ref, gent_ref, dh_ref, *, v, block_v, **opts
):
  h, y = h_ref[...], y_ref[...]
  per_token = (lse_ref[...], mean_ref[...], glp_ref[...], gent_ref[...])
  local = lax.broadcasted_iota(jnp.int32, (h.shape[0], block_v), 1)

  def body(j, dh):
    start = pl.multiple_of(j * block_v, block_v)
    w = w_ref[:, pl.ds(start, block_v)]
    lg, dl_dz, valid = _block_logits(h, w, start + local, v, **opts)
    dz = xla.logit_grad(lg, dl_dz, start + local, y, valid, *per_token)
    return dh + lax.dot_general(dz.astype(w.dtype), w, NT, preferred_element_type=F32)

  dh = lax.fori_loop(0, w_ref.shape[1] // block_v, body, jnp.zeros(h.shape, F32))
  dh_ref[...] = dh.astype(dh_ref.dtype)


def _dw_kernel(
  h_ref, w_ref, y_ref, lse_ref, mean_ref, glp_ref, gent_ref, dw_ref, *, v, block_v, block_t, **opts
):
  w = w_ref[...]
  start_v = pl.program_id(0) * block_v
  cols = start_v + lax.broadcasted_iota(jnp.int32, (block_t, block_v), 1)

  def body(i, dw):
    rows = pl.ds(pl.multiple_of(i * block_t, block_t), block_t)
    h = h_ref[rows, :]
    lg, dl_dz, valid = _block_logits(h, w, cols, v, **opts)
    per_token = (lse_ref[rows], mean_ref[rows], glp_ref[rows], gent_ref[rows])
    dz = xla.logit_grad(lg, dl_dz, cols, y_ref[rows], valid, *per_token)
    return dw + lax.dot_general(h, dz.astype(h.dtype), TN, preferred_element_type=F32)

  dw = lax.fori_loop(0, h_ref.shape[0] // block_t, body, jnp.zeros(w.shape, F32))
  dw_ref[...] = dw.astype(dw_ref.dtype)


@functools.partial(jax.jit, static_argnames=('temperature', 'soft_cap', 'block_v', 'interpret'))
def forward(hidden, lm_head, targets, *, temperature, soft_cap, block_v=None, interpret=False):
  """(logprob, entropy, lse, mean logit), each [T] f32; see the module docstring."""
  t, v = hidden.shape[0], lm_head.shape[1]
  h, w, (y,), block_t, block_v = _prepare(hidden, lm_head, [targets], block_v)
  (tp, dp), vp = h.shape, w.shape[1]
  kernel = functools.partial(
    _fwd_kernel, v=v, block_v=block_v, temperature=temperature, soft_cap=soft_cap
  )
  token_spec = pl.BlockSpec((block_t,), lambda i: (i,))
  outs = pl.pallas_call(
    kernel,
    out_shape=[jax.ShapeDtypeStruct((tp,), F32)] * 4,
    grid=(tp // block_t,),
    in_specs=[
      pl.BlockSpec((block_t, dp), lambda i: (i, 0)),
      pl.BlockSpec((dp, vp), lambda i: (0, 0)),
      token_spec,
    ],
    out_specs=[token_spec] * 4,
    name='token_logprobs_fwd',
    **_params(interpret),
  )(h, w, y)
  return tuple(o[:t] for o in outs)


@functools.partial(jax.jit, static_argnames=('temperature', 'soft_cap', 'block_v', 'interpret'))
def backward(
  hidden,
  lm_head,
  targets,
  lse,
  mean_l,
  g_lp,
  g_ent,
  *,
  temperature,
  soft_cap,
  block_v=None,
  interpret=False,
):
  """(d hidden, d lm_head) with the logits recomputed block by block."""
  (t, d), v = hidden.shape, lm_head.shape[1]
  h, w, vectors, block_t, block_v = _prepare(
    hidden, lm_head, [targets, lse, mean_l, g_lp, g_ent], block_v
  )
  (tp, dp), vp = h.shape, w.shape[1]
  opts = dict(v=v, block_v=block_v, temperature=temperature, soft_cap=soft_cap)
  token_spec = pl.BlockSpec((block_t,), lambda i: (i,))
  dh = pl.pallas_call(
    functools.partial(_dh_kernel, **opts),
    out_shape=jax.ShapeDtypeStruct((tp, dp), F32),
    grid=(tp // block_t,),
    in_specs=[
      pl.BlockSpec((block_t, dp), lambda i: (i, 0)),
      pl.BlockSpec((dp, vp), lambda i: (0, 0)),
    ]
    + [token_spec] * 5,
    out_specs=pl.BlockSpec((block_t, dp), lambda i: (i, 0)),
    name='token_logprobs_bwd_dh',
    **_params(interpret),
  )(h, w, *vectors)
  all_tokens = pl.BlockSpec((tp,), lambda j: (0,))
  dw = pl.pallas_call(
    functools.partial(_dw_kernel, block_t=block_t, **opts),
    out_shape=jax.ShapeDtypeStruct((dp, vp), F32),
    grid=(vp // block_v,),
    in_specs=[
      pl.BlockSpec((tp, dp), lambda j: (0, 0)),
      pl.BlockSpec((dp, block_v), lambda j: (0, j)),
    ]
    + [all_tokens] * 5,
    out_specs=pl.BlockSpec((dp, block_v), lambda j: (0, j)),
    name='token_logprobs_bwd_dw',
    **_params(interpret),
  )(h, w, *vectors)
  return dh[:t, :d].astype(hidden.dtype), dw[:d, :v].astype(lm_head.dtype)
