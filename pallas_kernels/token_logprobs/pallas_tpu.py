"""Pallas TPU (Mosaic) kernels: the vocabulary is an 'arbitrary' (sequential) grid axis.

Forward: grid (token blocks, vocabulary blocks); VMEM scratch carries the running (max, sum exp,
sum exp * logit, target logit) across the vocabulary axis and the last step writes the outputs.
Backward: grid (token blocks, vocabulary blocks) accumulating d hidden in VMEM, and grid
(vocabulary blocks, token blocks) accumulating d lm_head, each recomputing its logit block.
Per-token vectors travel as [T, 1] columns. Inputs are zero-padded to whole blocks; padded
vocabulary columns are masked out and padded tokens get zero cotangents. `interpret` runs the
kernels with the TPU interpreter on any backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.token_logprobs import xla
from pallas_kernels.token_logprobs.xla import F32, NN, NT, TN

BLOCK_T = 256
BLOCK_V = 512


def _blocks(t: int, block_v: int | None) -> tuple[int, int]:
  block_t = min(BLOCK_T, pl.cdiv(t, 16) * 16)
  block_v = BLOCK_V if block_v is None else block_v
  if block_v % 128:
    raise ValueError(f'token_logprobs (tpu): chunk_size={block_v} must be a multiple of 128')
  return block_t, block_v


def _pad_to(x, axis: int, size: int):
  if x.shape[axis] == size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


def _prepare(hidden, lm_head, vectors, block_v):
  """Pads to whole blocks; per-token vectors become [Tp, 1] columns."""
  t, v = hidden.shape[0], lm_head.shape[1]
  block_t, block_v = _blocks(t, block_v)
  tp, vp = pl.cdiv(t, block_t) * block_t, pl.cdiv(v, block_v) * block_v
  vectors = [_pad_to(x, 0, tp)[:, None] for x in vectors]
  return _pad_to(hidden, 0, tp), _pad_to(lm_head, 1, vp), vectors, block_t, block_v


def _params(interpret: bool, semantics):
  if interpret:
    return dict(interpret=pltpu.InterpretParams())
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _block_logits(h, w, j, v, block_v, temperature, soft_cap):
  z = lax.dot_general(h, w, NN, preferred_element_type=F32)
  lg, dl_dz = xla.logits_of(z, temperature, soft_cap)
  cols = j * block_v + lax.broadcasted_iota(jnp.int32, lg.shape, 1)
  return lg, dl_dz, cols, (cols < v) if v % block_v else None


def _fwd_kernel(
  h_ref, w_ref, y_ref, lp_ref, ent_ref, lse_ref, mean_ref, *scratch, v, block_v, **opts
):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    for ref, value in zip(scratch, xla.init_stats(y_ref.shape), strict=True):
      ref[...] = value

  lg, _, cols, valid = _block_logits(h_ref[...], w_ref[...], j, v, block_v, **opts)
  stats = xla.online_update(tuple(r[...] for r in scratch), lg, cols, y_ref[...], valid)
  for ref, value in zip(scratch, stats, strict=True):
    ref[...] = value

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    lp_ref[...], ent_ref[...], lse_ref[...], mean_ref[...] = xla.finalize(stats)


def _dz(h_ref, w_ref, y_ref, lse_ref, mean_ref, glp_ref, gent_ref, j, v, block_v, opts):
  lg, dl_dz, cols, valid = _block_logits(h_ref[...], w_ref[...], j, v, block_v, **opts)
  per_token = (lse_ref[...], mean_ref[...], glp_ref[...], gent_ref[...])
  return xla.logit_grad(lg, dl_dz, cols, y_ref[...], valid, *per_token)


def _dh_kernel(*refs, v, block_v, **opts):
  *inputs, dh_ref, acc_ref = refs
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  w = inputs[1][...]
  dz = _dz(*inputs, j, v, block_v, opts)
  acc_ref[...] += lax.dot_general(dz.astype(w.dtype), w, NT, preferred_element_type=F32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _():
    dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dw_kernel(*refs, v, block_v, **opts):
  *inputs, dw_ref, acc_ref = refs
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  h = inputs[0][...]
  dz = _dz(*inputs, j, v, block_v, opts)
  acc_ref[...] += lax.dot_general(h, dz.astype(h.dtype), TN, preferred_element_type=F32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _():
    dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


@functools.partial(jax.jit, static_argnames=('temperature', 'soft_cap', 'block_v', 'interpret'))
def forward(hidden, lm_head, targets, *, temperature, soft_cap, block_v=None, interpret=False):
  """(logprob, entropy, lse, mean logit), each [T] f32; see the module docstring."""
  t, v = hidden.shape[0], lm_head.shape[1]
  h, w, (y,), block_t, block_v = _prepare(hidden, lm_head, [targets], block_v)
  (tp, d), vp = h.shape, w.shape[1]
  kernel = functools.partial(
    _fwd_kernel, v=v, block_v=block_v, temperature=temperature, soft_cap=soft_cap
  )
  column = pl.BlockSpec((block_t, 1), lambda i, j: (i, 0))
  outs = pl.pallas_call(
    kernel,
    out_shape=[jax.ShapeDtypeStruct((tp, 1), F32)] * 4,
    grid=(tp // block_t, vp // block_v),
    in_specs=[
      pl.BlockSpec((block_t, d), lambda i, j: (i, 0)),
      pl.BlockSpec((d, block_v), lambda i, j: (0, j)),
      column,
    ],
    out_specs=[column] * 4,
    scratch_shapes=[pltpu.VMEM((block_t, 1), F32)] * 4,
    name='token_logprobs_fwd',
    **_params(interpret, ('parallel', 'arbitrary')),
  )(h, w, y)
  return tuple(o[:t, 0] for o in outs)


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
  tp, vp = h.shape[0], w.shape[1]
  nt, nv = tp // block_t, vp // block_v
  opts = dict(v=v, block_v=block_v, temperature=temperature, soft_cap=soft_cap)

  def specs(tok, voc):
    """In-specs for (h, w, five columns) given grid-index -> (token block, vocab block) maps."""
    return [
      pl.BlockSpec((block_t, d), lambda *g: (tok(*g), 0)),
      pl.BlockSpec((d, block_v), lambda *g: (0, voc(*g))),
    ] + [pl.BlockSpec((block_t, 1), lambda *g: (tok(*g), 0))] * 5

  dh = pl.pallas_call(
    functools.partial(_dh_kernel, **opts),
    out_shape=jax.ShapeDtypeStruct((tp, d), F32),
    grid=(nt, nv),
    in_specs=specs(lambda i, j: i, lambda i, j: j),
    out_specs=pl.BlockSpec((block_t, d), lambda i, j: (i, 0)),
    scratch_shapes=[pltpu.VMEM((block_t, d), F32)],
    name='token_logprobs_bwd_dh',
    **_params(interpret, ('parallel', 'arbitrary')),
  )(h, w, *vectors)
  dw = pl.pallas_call(
    functools.partial(_dw_kernel, **opts),
    out_shape=jax.ShapeDtypeStruct((d, vp), F32),
    grid=(nv, nt),
    in_specs=specs(lambda j, i: i, lambda j, i: j),
    out_specs=pl.BlockSpec((d, block_v), lambda j, i: (0, j)),
    scratch_shapes=[pltpu.VMEM((d, block_v), F32)],
    name='token_logprobs_bwd_dw',
    **_params(interpret, ('parallel', 'arbitrary')),
  )(h, w, *vectors)
  return dh[:t].astype(hidden.dtype), dw[:, :v].astype(lm_head.dtype)
