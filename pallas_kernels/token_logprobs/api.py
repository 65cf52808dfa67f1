"""Public entry point: fused per-token log-probabilities and entropies from hidden states.

`token_logprobs(hidden, lm_head, targets)` scores targets under softmax(soft_cap(hidden @ lm_head) /
temperature) in vocabulary chunks with an online logsumexp, so the [T, V] logits never exist, in the
forward pass or the backward pass (a custom_vjp that recomputes the logits chunk by chunk).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import resolve_implementation
from pallas_kernels.token_logprobs import pallas_gpu, pallas_tpu, xla

OP = 'token_logprobs'
# Vocabulary chunk of the XLA path: at T=4096, d=512, V=32k its fwd+bwd temporaries are ~8% of the
# naive version's; 1024 ran slower on CPU and 4096 was no faster within the noise.
XLA_CHUNK = 2048


def _check_positive(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f'{OP}: {name} must be a Python number, got {type(value).__name__}')
  value = float(value)
  if not (value > 0 and math.isfinite(value)):
    raise ValueError(f'{OP}: {name} must be a finite number > 0, got {value}')
  return value


def _impl_fns(impl: str, chunk_size: int | None):
  """(forward, backward) of one implementation, with its vocabulary chunk bound."""
  if impl == 'xla':
    chunk = chunk_size or XLA_CHUNK
    return (
      functools.partial(xla.forward, chunk_size=chunk),
      functools.partial(xla.backward, chunk_size=chunk),
    )
  if impl in ('gpu', 'interpret'):
    opts = dict(block_v=chunk_size, interpret=impl == 'interpret')
    return (
      functools.partial(pallas_gpu.forward, **opts),
      functools.partial(pallas_gpu.backward, **opts),
    )
  return (
    functools.partial(pallas_tpu.forward, block_v=chunk_size),
    functools.partial(pallas_tpu.backward, block_v=chunk_size),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(hidden, lm_head, targets, temperature, soft_cap, impl, chunk_size):
  fwd, _ = _impl_fns(impl, chunk_size)
  lp, ent, _, _ = fwd(hidden, lm_head, targets, temperature=temperature, soft_cap=soft_cap)
  return lp, ent


def _fused_fwd(hidden, lm_head, targets, temperature, soft_cap, impl, chunk_size):
  fwd, _ = _impl_fns(impl, chunk_size)
  lp, ent, lse, mean_l = fwd(hidden, lm_head, targets, temperature=temperature, soft_cap=soft_cap)
  return (lp, ent), (hidden, lm_head, targets, lse, mean_l)


def _fused_bwd(temperature, soft_cap, impl, chunk_size, residuals, cotangents):
  hidden, lm_head, targets, lse, mean_l = residuals
  g_lp, g_ent = (jnp.asarray(g, jnp.float32) for g in cotangents)
  _, bwd = _impl_fns(impl, chunk_size)
  dh, dw = bwd(
    hidden, lm_head, targets, lse, mean_l, g_lp, g_ent, temperature=temperature, soft_cap=soft_cap
  )
  return dh, dw, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def token_logprobs(
  hidden: jax.Array,
  lm_head: jax.Array,
  targets: jax.Array,
  *,
  temperature: float = 1.0,
  soft_cap: float | None = None,
  chunk_size: int | None = None,
  implementation: str = 'auto',
) -> tuple[jax.Array, jax.Array]:
  """(log p(targets), entropy of p), both float32 with the shape of `targets`.

  hidden [..., d] (f32 or bf16), lm_head [d, V] (promoted to a common dtype with hidden), targets [...] integer ids in [0, V) (ids outside
  that range give meaningless values). Logits are soft_cap * tanh(hidden @ lm_head / soft_cap) /
  temperature, accumulated in float32. Differentiable w.r.t. hidden and lm_head for both outputs.
  chunk_size: the vocabulary chunk (None: each implementation's default). implementation:
  'auto' | 'xla' | 'pallas' | 'interpret' (see pallas_kernels.common.resolve_implementation). On
  GPU the Pallas kernel keeps [block, d] tiles in shared memory, so it serves d up to about 2048
  (bf16) / 1024 (f32); wider models take the XLA path under 'auto' (an error under 'pallas').
  """
  impl = resolve_implementation(implementation, op=OP)
  hidden, lm_head, targets = jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(targets)
  if hidden.ndim < 1 or lm_head.ndim != 2:
    raise ValueError(
      f'{OP}: expected hidden [..., d] and lm_head [d, V], got hidden {hidden.shape} and '
      f'lm_head {lm_head.shape}'
    )
  if hidden.shape[-1] != lm_head.shape[0]:
    raise ValueError(
      f'{OP}: hidden size mismatch: hidden {hidden.shape} has d={hidden.shape[-1]} but lm_head '
      f'{lm_head.shape} has d={lm_head.shape[0]}'
    )
  if targets.shape != hidden.shape[:-1]:
    raise ValueError(
      f'{OP}: targets shape {targets.shape} must equal the leading shape of hidden '
      f'{hidden.shape[:-1]} (hidden is {hidden.shape})'
    )
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f'{OP}: targets must be integer token ids, got dtype {targets.dtype}')
  for name, x in (('hidden', hidden), ('lm_head', lm_head)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f'{OP}: {name} must be floating point, got dtype {x.dtype}')
  dtype = jnp.result_type(hidden.dtype, lm_head.dtype)  # one operand dtype for the kernels
  hidden, lm_head = hidden.astype(dtype), lm_head.astype(dtype)
  temperature = _check_positive('temperature', temperature)
  if soft_cap is not None:
    soft_cap = _check_positive('soft_cap', soft_cap)
  if chunk_size is not None and (
    isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
  ):
    raise ValueError(f'{OP}: chunk_size must be a positive int or None, got {chunk_size!r}')
  lead = targets.shape
  h2 = hidden.reshape(-1, hidden.shape[-1])
  y = targets.reshape(-1).astype(jnp.int32)
  if h2.shape[0] == 0:
    empty = jnp.zeros(lead, jnp.float32)
    return empty, empty
  if impl == 'gpu' and not pallas_gpu.fits(h2.shape[1], jnp.dtype(dtype).itemsize, chunk_size):
    if implementation != 'auto':
      raise ValueError(
        f'{OP}: the Pallas GPU kernel cannot hold d={h2.shape[1]} {jnp.dtype(dtype).name} tiles '
        f'(chunk_size={chunk_size}) in shared memory; use implementation="xla" or "auto"'
      )
    impl, chunk_size = 'xla', None  # the chunked XLA path has no such limit
  lp, ent = _fused(h2, lm_head, y, temperature, soft_cap, impl, chunk_size)
  return lp.reshape(lead), ent.reshape(lead)
