"""XLA path: `lax.scan` over vocabulary chunks with an online logsumexp (forward) and a chunked
recompute of the logits (backward); never holds more than [T, chunk] logits.

The per-chunk math (`logits_of`, `online_update`, `finalize`, `logit_grad`) is shared with the Pallas
kernels so every implementation computes the same formulas:

  lg = soft_cap(h @ W) / temperature,  p = softmax(lg),  logprob = lg[y] - lse,  entropy = lse - sum(p * lg)
  d logprob / d lg = onehot(y) - p,    d entropy / d lg = -p * (lg - sum(p * lg))
  d lg / d z = (1 - tanh(z / c)^2) / temperature   (1 / temperature without soft-capping)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
# dot_general dimension numbers: a @ b, a @ b.T, a.T @ b.
NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))
TN = (((0,), (0,)), ((), ()))


def logits_of(z, temperature: float, soft_cap: float | None):
  """Transformed logits lg and dlg/dz (an array, or a Python float when soft_cap is None)."""
  inv_t = 1.0 / temperature
  if soft_cap is None:
    return (z * inv_t if temperature != 1.0 else z), inv_t
  t = jnp.tanh(z * (1.0 / soft_cap))
  return t * (soft_cap * inv_t), (1.0 - t * t) * inv_t


def init_stats(shape):
  """Running (max, sum exp, sum exp * logit, target logit) for the online logsumexp."""
  return (
    jnp.full(shape, -jnp.inf, F32),
    jnp.zeros(shape, F32),
    jnp.zeros(shape, F32),
    jnp.zeros(shape, F32),
  )


def _col(x, like):
  """x as a column broadcastable against [rows, chunk] (x is [rows] or already [rows, 1])."""
  return x if x.ndim == like.ndim else x[:, None]


def _row_sum(x, like):
  """Sum over the chunk, shaped like the per-token statistic `like` ([rows] or [rows, 1])."""
  return jnp.sum(x, axis=-1, keepdims=like.ndim == 2)


def online_update(stats, lg, cols, targets, valid):
  """Folds one [rows, chunk] block of logits into the running statistics.

  Statistics and targets are [rows] (or [rows, 1], as TPU kernels keep them); cols: the block's
  vocabulary ids (broadcastable to lg); valid: a mask of real (not padded) columns, or None when
  the block has no padding.
  """
  m, s, a, picked = stats
  if valid is not None:
    lg = jnp.where(valid, lg, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(lg, axis=-1, keepdims=m.ndim == 2))
  e = jnp.exp(lg - _col(m_new, lg))  # 0 on padded columns
  el = e * lg if valid is None else jnp.where(valid, e * lg, 0.0)
  scale = jnp.exp(m - m_new)
  hit = cols == _col(targets, lg)
  picked = picked + _row_sum(jnp.where(hit, lg, 0.0), m)
  return m_new, s * scale + _row_sum(e, m), a * scale + _row_sum(el, m), picked


def finalize(stats):
  """(logprob, entropy, lse, mean logit under p) from the running statistics."""
  m, s, a, picked = stats
  lse = m + jnp.log(s)
  mean_l = a / s
  return picked - lse, lse - mean_l, lse, mean_l


def logit_grad(lg, dl_dz, cols, targets, valid, lse, mean_l, g_lp, g_ent):
  """d loss / d z for one block: (g_lp * (onehot - p) - g_ent * p * (lg - mean_l)) * dlg/dz."""
  g_lp, g_ent = _col(g_lp, lg), _col(g_ent, lg)
  p = jnp.exp(lg - _col(lse, lg))
  dlg = p * (-g_lp - g_ent * (lg - _col(mean_l, lg)))
  dlg = dlg + jnp.where(cols == _col(targets, lg), g_lp, 0.0)
  if valid is not None:
    dlg = jnp.where(valid, dlg, 0.0)
  return dlg * dl_dz


def _chunks(lm_head, chunk: int):
  """lm_head [d, V] -> [n, chunk, d] (transposed so chunks are contiguous; zero-padded tail)."""
  d, v = lm_head.shape
  n = -(-v // chunk)
  wt = lm_head.T
  if n * chunk != v:
    wt = jnp.pad(wt, ((0, n * chunk - v), (0, 0)))
  return wt.reshape(n, chunk, d), n


@functools.partial(jax.jit, static_argnames=('temperature', 'soft_cap', 'chunk_size'))
def forward(hidden, lm_head, targets, *, temperature, soft_cap, chunk_size):
  """hidden [T, d], lm_head [d, V], targets [T] -> (logprob, entropy, lse, mean_l), all [T] f32."""
  v = lm_head.shape[1]
  chunk = min(chunk_size, v)
  w_chunks, n = _chunks(lm_head, chunk)
  padded = n * chunk != v
  local = jnp.arange(chunk, dtype=jnp.int32)[None, :]

  def body(stats, xs):
    w, j = xs
    z = lax.dot_general(hidden, w, NT, preferred_element_type=F32)
    lg, _ = logits_of(z, temperature, soft_cap)
    cols = j * chunk + local
    return online_update(stats, lg, cols, targets, cols < v if padded else None), None

  stats, _ = lax.scan(body, init_stats(targets.shape), (w_chunks, jnp.arange(n, dtype=jnp.int32)))
  return finalize(stats)


@functools.partial(jax.jit, static_argnames=('temperature', 'soft_cap', 'chunk_size'))
def backward(
  hidden, lm_head, targets, lse, mean_l, g_lp, g_ent, *, temperature, soft_cap, chunk_size
):
  """(d hidden, d lm_head) by recomputing each [T, chunk] block of logits."""
  d, v = lm_head.shape
  chunk = min(chunk_size, v)
  w_chunks, n = _chunks(lm_head, chunk)
  padded = n * chunk != v
  local = jnp.arange(chunk, dtype=jnp.int32)[None, :]
  h32 = hidden.astype(F32)

  def body(dh, xs):
    w, j = xs
    z = lax.dot_general(hidden, w, NT, preferred_element_type=F32)
    lg, dl_dz = logits_of(z, temperature, soft_cap)
    cols = j * chunk + local
    valid = cols < v if padded else None
    dz = logit_grad(lg, dl_dz, cols, targets, valid, lse, mean_l, g_lp, g_ent)
    dh = dh + lax.dot_general(dz, w.astype(F32), NN, preferred_element_type=F32)
    dw_t = lax.dot_general(dz, h32, TN, preferred_element_type=F32)  # [chunk, d]
    return dh, dw_t

  dh, dw_t = lax.scan(
    body, jnp.zeros(hidden.shape, F32), (w_chunks, jnp.arange(n, dtype=jnp.int32))
  )
  dw = dw_t.reshape(n * chunk, d)[:v].T
  return dh.astype(hidden.dtype), dw.astype(lm_head.dtype)
