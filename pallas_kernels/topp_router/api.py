"""Public entry point: the fused MoE router for a block of tokens.

`topp_router(x, router_w, p=..., k_max=...)` computes router logits x @ W_r and a float32 softmax,
selects each token's Top-P experts (exclusive cumulative sum <= p over the experts sorted by
probability, top-1 always kept; experiments/topp_moe/README.md) among its top k_max, and counts the
tokens sent to each expert. The result equals `reference.topp_router` (the unfused
`kuaijax.routing` path). All implementations share one backward pass (custom_vjp in `xla.backward`):
gradients reach x and router_w through the kept weights and through the returned logits (e.g. a
z-loss or the balance / entropy losses computed from them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kuaijax import routing
from pallas_kernels.common import resolve_implementation
from pallas_kernels.topp_router import pallas_gpu, pallas_tpu, xla

OP = 'topp_router'


def _forward_fn(impl: str):
  if impl == 'xla':
    return xla.forward
  if impl in ('gpu', 'interpret'):
    return functools.partial(pallas_gpu.forward, interpret=impl == 'interpret')
  return pallas_tpu.forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _router(x, router_w, p, k_max, impl):
  return _forward_fn(impl)(x, router_w, p=p, k_max=k_max)


def _router_fwd(x, router_w, p, k_max, impl):
  out = _forward_fn(impl)(x, router_w, p=p, k_max=k_max)
  _, expert_ids, _, logits = out
  return out, (x, router_w, logits, expert_ids)


def _router_bwd(p, k_max, impl, residuals, cotangents):
  del p, k_max, impl
  d_weights, _, _, d_logits = cotangents
  x, router_w, logits, expert_ids = residuals
  return xla.backward(x, router_w, logits, expert_ids, d_weights, d_logits)


_router.defvjp(_router_fwd, _router_bwd)


def topp_router(
  x: jax.Array,
  router_w: jax.Array,
  *,
  p: float,
  k_max: int | None = None,
  implementation: str = 'auto',
):
  """(weights[T, k_max] f32, expert_ids[T, k_max] int32, counts[E] int32, logits[T, E] f32).

  x [T, d] (or [..., d]: leading dims are kept in the outputs, counts are over all tokens),
  router_w [d, E], f32 or bf16; logits are accumulated in float32. Dropped slots carry weight 0 and
  the sentinel id E; weights are the raw probabilities (no renormalisation). k_max None -> E.
  implementation: 'auto' | 'xla' | 'pallas' | 'interpret' (see pallas_kernels.common).
  """
  impl = resolve_implementation(implementation, op=OP)
  x, router_w = jnp.asarray(x), jnp.asarray(router_w)
  if x.ndim < 1 or router_w.ndim != 2:
    raise ValueError(
      f'{OP}: expected x [T, d] and router_w [d, E], got x {x.shape} and router_w {router_w.shape}'
    )
  if x.shape[-1] != router_w.shape[0]:
    raise ValueError(
      f'{OP}: x {x.shape} has d={x.shape[-1]} but router_w {router_w.shape} has d={router_w.shape[0]}'
    )
  for name, a in (('x', x), ('router_w', router_w)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f'{OP}: {name} must be floating point, got dtype {a.dtype}')
  num_experts = router_w.shape[1]
  try:
    p = routing.check_p(p)
    k_max = num_experts if k_max is None else routing.check_k('k_max', k_max, num_experts)
  except ValueError as err:
    raise ValueError(f'{OP}: {err}') from None
  lead = x.shape[:-1]
  weights, ids, counts, logits = _router(x.reshape(-1, x.shape[-1]), router_w, p, k_max, impl)
  return (
    weights.reshape(*lead, k_max),
    ids.reshape(*lead, k_max),
    counts,
    logits.reshape(*lead, num_experts),
  )
