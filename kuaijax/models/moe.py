"""Mixture-of-Experts feed-forward: router, dispatch strategies and the NNX layer (`model.mlp='moe'`).

`moe_ffn(x[T,d], router_w[d,E], w1[E,d,f], w3[E,d,f], w2[E,f,d], ...)` is the pure function:
router logits and softmax in float32, Top-K or dynamic Top-P selection (`kuaijax.routing`), SwiGLU
experts `E_i(x) = W2_i (silu(W1_i x) * (W3_i x))`, output `sum_{kept i} g_i E_i(x)` with the raw
routing weights g (renormalised only when asked, Top-K style), plus optional always-on shared
experts (DeepSeekMoE). It returns `(y[T,d], aux)`; aux holds the auxiliary losses and routing stats.

Dispatch strategies (all exact when nothing is dropped; tested against each other):
- 'dense': every expert on every token, masked by the gates; three big 2-D GEMMs (E/k x the FLOPs).
  The reference.
- 'capacity': a fixed buffer of C = ceil(capacity_factor * T * K / E) rows per expert (K = routing
  slots: k, or k_max for Top-P); the lowest-weight assignments of an overfull expert are dropped and
  counted (aux 'drop_rate' = dropped / kept assignments).
- 'dropless': (token, slot) pairs sorted by expert id (sentinel last), grouped matmuls through
  `pallas_kernels.gmm` (Pallas kernel on GPU/TPU, a tiled loop of 2-D GEMMs on CPU), weighted
  combine back to tokens. Row permutations carry gather-only VJPs (no scatters).
- 'auto': 'dense' when every expert is selected anyway (E <= K), else 'dropless' (measured by
  experiments/bench_moe.py, on CPU the fastest exact strategy).

Expert parallelism (experts sharded over the mesh axis 'expert', tokens exchanged by all-to-all in
`jax.shard_map`) lives in `kuaijax.models.expert_parallel`; the layer uses it whenever the current
mesh (`kuaijax.parallel.axis_rules`) has an 'expert' axis larger than 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from kuaijax import parallel
from kuaijax import routing as routing_lib
from kuaijax.models.layers import MLP_REGISTRY, param, register_mlp
from pallas_kernels.gmm import gmm

ROUTINGS = ('top_k', 'top_p')
DISPATCHES = ('auto', 'dense', 'capacity', 'dropless')
DEFAULT_CAPACITY_FACTOR = 1.25


# ----------------------------------------------------------------------------- validation


def num_slots(num_experts: int, routing_name: str, k: int, k_max: int | None) -> int:
  """Routing slots per token: k for Top-K, k_max (default min(E, 4)) for Top-P."""
  if routing_name == 'top_k':
    return k
  return min(num_experts, 4) if k_max is None else k_max


def check_options(
  *,
  num_experts: int,
  routing_name: str,
  p,
  k,
  k_max,
  dispatch: str,
  capacity_factor,
  prefix: str = '',
) -> None:
  """Raises a ValueError naming the field (with `prefix`, e.g. 'model.mlp_options.') when bad."""

  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  if not is_int(num_experts) or num_experts < 1:
    raise ValueError(f'{prefix}num_experts={num_experts!r} must be a positive int')
  if routing_name not in ROUTINGS:
    raise ValueError(f'{prefix}routing={routing_name!r} is not one of {list(ROUTINGS)}')
  if dispatch not in DISPATCHES:
    raise ValueError(f'{prefix}dispatch={dispatch!r} is not one of {list(DISPATCHES)}')
  if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 < p <= 1.0:
    raise ValueError(f'{prefix}p={p!r} must be a number in (0, 1]')
  if not is_int(k) or not 1 <= k <= num_experts:
    raise ValueError(f'{prefix}k={k!r} must be an int in [1, {num_experts}] (num_experts)')
  if k_max is not None and (not is_int(k_max) or not 1 <= k_max <= num_experts):
    raise ValueError(f'{prefix}k_max={k_max!r} must be None or an int in [1, {num_experts}]')
  if capacity_factor is not None and (
    isinstance(capacity_factor, bool)
    or not isinstance(capacity_factor, int | float)
    or not capacity_factor > 0
  ):
    raise ValueError(f'{prefix}capacity_factor={capacity_factor!r} must be None or a number > 0')


def resolve_dispatch(dispatch: str, num_experts: int, slots: int) -> str:
  """'auto' -> the fastest exact strategy: 'dense' when every expert is used anyway, else dropless."""
  if dispatch != 'auto':
    return dispatch
  return 'dense' if num_experts <= slots else 'dropless'


def expert_capacity(capacity_factor, tokens: int, slots: int, num_experts: int) -> int:
  """Rows per expert of the 'capacity' strategy (at most `tokens`: a token picks an expert once)."""
  cf = DEFAULT_CAPACITY_FACTOR if capacity_factor is None else capacity_factor
  return max(1, min(tokens, math.ceil(cf * tokens * slots / num_experts)))


# ----------------------------------------------------------------------------- building blocks


def swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
  """Dense SwiGLU `(silu(x w1) * (x w3)) w2` for x [T, d] (shared experts, dense baselines)."""
  return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2


def _counts(flat_ids: jax.Array, num_experts: int) -> jax.Array:
  """Assignments per expert (sentinel ids >= E ignored), int32 [E]."""
  return jnp.zeros((num_experts,), jnp.int32).at[flat_ids].add(1, mode='drop')


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_slots(x, order, inverse, slots):
  """Rows of x for the sorted (token, slot) pairs: x[order // slots] -> [T*slots, d].

  The VJP sums each token's slot rows through the inverse permutation (a gather, no scatter).
  """
  return jnp.take(x, order // slots, axis=0)


def _gather_slots_fwd(x, order, inverse, slots):
  return _gather_slots(x, order, inverse, slots), (order, inverse, x.shape[0])


def _gather_slots_bwd(slots, res, g):
  order, inverse, tokens = res
  dx = jnp.take(g, inverse, axis=0).reshape(tokens, slots, -1).sum(axis=1)
  return dx, None, None


_gather_slots.defvjp(_gather_slots_fwd, _gather_slots_bwd)


@jax.custom_vjp
def _unsort(rows, order, inverse):
  """Sorted rows back to (token, slot) order: rows[inverse]; the VJP gathers by `order`."""
  return jnp.take(rows, inverse, axis=0)


def _unsort_fwd(rows, order, inverse):
  return _unsort(rows, order, inverse), (order, inverse)


def _unsort_bwd(res, g):
  order, inverse = res
  return jnp.take(g, order, axis=0), None, None


_unsort.defvjp(_unsort_fwd, _unsort_bwd)


def _combine(weights: jax.Array, out_slots: jax.Array, dtype) -> jax.Array:
  """sum_s weights[t, s] * out_slots[t, s] in float32 -> [T, d] in `dtype`."""
  y = jnp.sum(weights[:, :, None] * out_slots.astype(jnp.float32), axis=1)
  return y.astype(dtype)


# ----------------------------------------------------------------------------- strategies
# Each strategy: (x[T,d], weights[T,K] f32, ids[T,K] int32 (sentinel E), w1, w3, w2, **options)
# -> (y[T,d] in x.dtype, dropped assignments int32 scalar).


def dispatch_dense(x, weights, ids, w1, w3, w2, **_):
  """Every expert on every token; gates [T, E] scale the hidden units before W2."""
  num_experts, d, f = w1.shape
  gates = jnp.einsum('tk,tke->te', weights, jax.nn.one_hot(ids, num_experts, dtype=jnp.float32))
  w13 = jnp.concatenate([w1, w3], axis=2).transpose(1, 0, 2).reshape(d, num_experts * 2 * f)
  h = (x @ w13).reshape(x.shape[0], num_experts, 2, f)
  h = jax.nn.silu(h[:, :, 0]) * h[:, :, 1] * gates[:, :, None].astype(x.dtype)
  y = h.reshape(x.shape[0], num_experts * f) @ w2.reshape(num_experts * f, d)
  return y, jnp.zeros((), jnp.int32)


def dispatch_dropless(
  x, weights, ids, w1, w3, w2, *, gmm_implementation='auto', grouped_matmul=None, **_
):
  """Sorted (token, slot) rows, grouped matmuls (`pallas_kernels.gmm`), weighted combine.

  grouped_matmul: optional `fn(lhs[m,k], rhs[G,k,n], group_sizes[G]) -> [m,n]` replacing gmm
  (benchmark baselines such as `jax.lax.ragged_dot`).
  """
  tokens, slots = ids.shape
  num_experts, d, f = w1.shape
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sentinel (E) rows last
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
  sizes = _counts(flat, num_experts)
  xs = _gather_slots(x, order, inverse, slots)
  mm = grouped_matmul or functools.partial(
    gmm, preferred_element_type=x.dtype, implementation=gmm_implementation
  )
  h = mm(xs, jnp.concatenate([w1, w3], axis=2), sizes)
  out = mm(jax.nn.silu(h[:, :f]) * h[:, f:], w2, sizes)
  out_slots = _unsort(out, order, inverse).reshape(tokens, slots, d)
  return _combine(weights, out_slots, x.dtype), jnp.zeros((), jnp.int32)


def dispatch_capacity(x, weights, ids, w1, w3, w2, *, capacity_factor=None, **_):
  """A [E, C] buffer per expert; the lowest-weight assignments of an overfull expert are dropped."""
  tokens, slots = ids.shape
  num_experts, d, f = w1.shape
  cap = expert_capacity(capacity_factor, tokens, slots, num_experts)
  flat, flat_w = ids.reshape(-1), weights.reshape(-1)
  # Within each expert, highest weight first (stable: ties keep token order).
  order = jnp.lexsort((-jax.lax.stop_gradient(flat_w), flat)).astype(jnp.int32)
  sizes = _counts(flat, num_experts)
  starts = jnp.cumsum(sizes) - sizes
  sorted_ids = flat[order]
  rank_sorted = (
    jnp.arange(order.shape[0], dtype=jnp.int32) - starts[jnp.minimum(sorted_ids, num_experts - 1)]
  )
  rank = jnp.zeros_like(order).at[order].set(rank_sorted)
  valid = flat < num_experts
  keep = valid & (rank < cap)
  slot_pos = jnp.where(keep, flat * cap + rank, num_experts * cap)  # past the end: dropped
  table = jnp.full((num_experts * cap,), tokens, jnp.int32)
  table = table.at[slot_pos].set(jnp.arange(flat.shape[0], dtype=jnp.int32) // slots, mode='drop')
  xb = jnp.take(x, table, axis=0, mode='fill', fill_value=0).reshape(num_experts, cap, d)
  h1 = jnp.einsum('ecd,edf->ecf', xb, w1)
  h3 = jnp.einsum('ecd,edf->ecf', xb, w3)
  out = jnp.einsum('ecf,efd->ecd', jax.nn.silu(h1) * h3, w2).reshape(num_experts * cap, d)
  out_slots = jnp.take(out, slot_pos, axis=0, mode='fill', fill_value=0).reshape(tokens, slots, d)
  dropped = jnp.sum(valid & ~keep).astype(jnp.int32)
  return _combine(weights, out_slots, x.dtype), dropped


STRATEGIES = {
  'dense': dispatch_dense,
  'capacity': dispatch_capacity,
  'dropless': dispatch_dropless,
}


# ----------------------------------------------------------------------------- the pure layer


def route(x, router_w, *, routing_name, p, k, k_max, renormalize):
  """Float32 router: (logits[T,E], probs[T,E], weights[T,K], ids[T,K], truncated[T])."""
  logits = x.astype(jnp.float32) @ router_w.astype(jnp.float32)
  probs = routing_lib.router_probs(logits)
  num_experts = router_w.shape[1]
  if routing_name == 'top_p':
    k_max = num_slots(num_experts, 'top_p', k, k_max)
    weights, ids, truncated = routing_lib.top_p_with_truncation(probs, p=p, k_max=k_max)
    if renormalize:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  else:
    weights, ids = routing_lib.top_k(probs, k=k, renormalize=renormalize)
    truncated = jnp.zeros(x.shape[:1], bool)
  return logits, probs, weights, ids, truncated


def moe_ffn(
  x: jax.Array,
  router_w: jax.Array,
  w1: jax.Array,
  w3: jax.Array,
  w2: jax.Array,
  *,
  routing: str = 'top_p',
  p: float = 0.4,
  k: int = 2,
  k_max: int | None = None,
  renormalize: bool = False,
  dispatch: str = 'auto',
  capacity_factor: float | None = None,
  shared: tuple[jax.Array, jax.Array, jax.Array] | None = None,
  gmm_implementation: str = 'auto',
  grouped_matmul=None,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, dict]:
  """MoE SwiGLU feed-forward over tokens x [T, d]; see the module docstring.

  shared: optional (w1 [d, fs], w3 [d, fs], w2 [fs, d]) of the always-on shared experts.
  gmm_implementation / grouped_matmul: the grouped matmul of 'dropless' (see dispatch_dropless).
  mesh: a mesh with an 'expert' axis > 1 switches to expert parallelism (tokens sharded over the
  mesh's batch axes, experts over 'expert'); `capacity_factor` then also sizes the all-to-all
  buffers (None: worst case, nothing dropped).
  Returns y [T, d] (x.dtype) and aux: 'balance_loss', 'entropy_loss', 'router_z_loss', 'mean_k',
  'max_k', 'drop_rate', 'trunc_rate' (scalars), 'k_hist' [K+1], 'expert_load' [E],
  'experts_per_token' [T].
  """
  routing_name = routing
  num_experts = router_w.shape[-1]
  check_options(
    num_experts=num_experts,
    routing_name=routing_name,
    p=p,
    k=k,
    k_max=k_max,
    dispatch=dispatch,
    capacity_factor=capacity_factor,
  )
  if x.ndim != 2 or router_w.shape[0] != x.shape[1]:
    raise ValueError(f'moe_ffn: need x [T, d] and router_w [d, E], got {x.shape}, {router_w.shape}')
  e, d, f = w1.shape if w1.ndim == 3 else (None, None, None)
  if e != num_experts or d != x.shape[1] or w3.shape != w1.shape or w2.shape != (e, f, d):
    raise ValueError(
      f'moe_ffn: need w1, w3 [E={num_experts}, d, f] and w2 [E, f, d], got '
      f'{w1.shape}, {w3.shape}, {w2.shape}'
    )
  dt = x.dtype
  w1, w3, w2 = (w.astype(dt) for w in (w1, w3, w2))
  logits, probs, weights, ids, truncated = route(
    x, router_w, routing_name=routing_name, p=p, k=k, k_max=k_max, renormalize=renormalize
  )
  slots = ids.shape[1]
  strategy = resolve_dispatch(dispatch, num_experts, slots)
  options = dict(
    capacity_factor=capacity_factor,
    gmm_implementation=gmm_implementation,
    grouped_matmul=grouped_matmul,
  )
  if mesh is not None and mesh.shape.get('expert', 1) > 1:
    from kuaijax.models import expert_parallel

    y, dropped = expert_parallel.expert_parallel_ffn(
      x, weights, ids, w1, w3, w2, mesh=mesh, local_dispatch=strategy, **options
    )
  else:
    y, dropped = STRATEGIES[strategy](x, weights, ids, w1, w3, w2, **options)
  if shared is not None:
    y = y + swiglu(x, *(w.astype(dt) for w in shared))
  stats = routing_lib.routing_stats(ids, num_experts, truncated=truncated)
  kept = jnp.maximum(jnp.sum(ids < num_experts), 1)
  aux = {
    'balance_loss': routing_lib.balance_loss(probs, ids),
    'entropy_loss': routing_lib.router_entropy(probs),
    'router_z_loss': routing_lib.router_z_loss(logits),
    'drop_rate': dropped.astype(jnp.float32) / kept.astype(jnp.float32),
    **stats,
  }
  return y, aux


# ----------------------------------------------------------------------------- the NNX layer

MOE_OPTIONS = (
  'num_experts',
  'expert_d_ff',
  'routing',
  'p',
  'k',
  'k_max',
  'renormalize',
  'dispatch',
  'capacity_factor',
  'num_shared_experts',
  'expert_frequency',
  'first_dense_layers',
  'gmm_implementation',
)


class MoE(nnx.Module):
  """Router (float32) + stacked SwiGLU experts [E, d, f] / [E, f, d] + optional shared experts."""

  def __init__(
    self,
    dim: int,
    *,
    num_experts: int,
    expert_d_ff: int,
    routing: str = 'top_p',
    p: float = 0.4,
    k: int = 2,
    k_max: int | None = None,
    renormalize: bool = False,
    dispatch: str = 'auto',
    capacity_factor: float | None = None,
    num_shared_experts: int = 0,
    gmm_implementation: str = 'auto',
    std: float,
    out_std: float,
    param_dtype=jnp.float32,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    check_options(
      num_experts=num_experts,
      routing_name=routing,
      p=p,
      k=k,
      k_max=k_max,
      dispatch=dispatch,
      capacity_factor=capacity_factor,
    )
    if not isinstance(expert_d_ff, int) or expert_d_ff < 1:
      raise ValueError(f'expert_d_ff={expert_d_ff!r} must be a positive int')
    if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
      raise ValueError(f'num_shared_experts={num_shared_experts!r} must be an int >= 0')
    # A sorted tuple, not a dict: NNX graphdefs must stay hashable (jit static args, cache keys).
    self.options = tuple(
      sorted(
        dict(
          routing=routing,
          p=p,
          k=k,
          k_max=k_max,
          renormalize=bool(renormalize),
          dispatch=dispatch,
          capacity_factor=capacity_factor,
          gmm_implementation=gmm_implementation,
        ).items()
      )
    )
    self.dtype = dtype
    e, f = num_experts, expert_d_ff
    self.router = param(rngs, (dim, e), ('embed', 'expert'), std=std, dtype=jnp.float32)
    self.w1 = param(rngs, (e, dim, f), ('expert', 'embed', 'mlp'), std=std, dtype=param_dtype)
    self.w3 = param(rngs, (e, dim, f), ('expert', 'embed', 'mlp'), std=std, dtype=param_dtype)
    self.w2 = param(rngs, (e, f, dim), ('expert', 'mlp', 'embed'), std=out_std, dtype=param_dtype)
    self.num_shared_experts = num_shared_experts
    if num_shared_experts:
      fs = num_shared_experts * f  # the sum of s SwiGLUs is one SwiGLU with s times the width
      self.shared_w1 = param(rngs, (dim, fs), ('embed', 'mlp'), std=std, dtype=param_dtype)
      self.shared_w3 = param(rngs, (dim, fs), ('embed', 'mlp'), std=std, dtype=param_dtype)
      self.shared_w2 = param(rngs, (fs, dim), ('mlp', 'embed'), std=out_std, dtype=param_dtype)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
    lead, d = x.shape[:-1], x.shape[-1]
    shared = None
    if self.num_shared_experts:
      shared = (self.shared_w1[...], self.shared_w3[...], self.shared_w2[...])
    current = parallel.current_axis_rules()
    mesh = current[0] if current is not None else None
    if mesh is not None and mesh.shape.get('expert', 1) > 1:
      num_experts = self.router.shape[1]
      if num_experts % mesh.shape['expert']:
        raise ValueError(
          f'num_experts={num_experts} is not divisible by the expert mesh axis size '
          f'{mesh.shape["expert"]}'
        )
    else:
      mesh = None
    y, aux = moe_ffn(
      x.astype(self.dtype).reshape(-1, d),
      self.router[...],
      self.w1[...],
      self.w3[...],
      self.w2[...],
      shared=shared,
      mesh=mesh,
      **dict(self.options),
    )
    aux['experts_per_token'] = aux['experts_per_token'].reshape(lead)
    return y.reshape(*lead, d), aux


def is_moe_layer(layer_index: int, *, expert_frequency: int = 1, first_dense_layers: int = 0):
  """Layers first_dense_layers, first_dense_layers + n, ... are MoE (n = expert_frequency)."""
  if layer_index < first_dense_layers:
    return False
  return (layer_index - first_dense_layers) % expert_frequency == 0


def moe_layer_options(options: Mapping) -> dict:
  """Validates `model.mlp_options` of an MoE model; returns them with defaults filled in."""
  prefix = 'model.mlp_options.'
  unknown = sorted(set(options) - set(MOE_OPTIONS))
  if unknown:
    raise ValueError(f'{prefix[:-1]} has unknown keys {unknown}; known: {sorted(MOE_OPTIONS)}')
  if 'num_experts' not in options:
    raise ValueError(f'{prefix}num_experts is required for model.mlp="moe"')
  opts = dict(
    routing='top_p',
    p=0.4,
    k=2,
    k_max=None,
    renormalize=False,
    dispatch='auto',
    capacity_factor=None,
    num_shared_experts=0,
    expert_frequency=1,
    first_dense_layers=0,
    gmm_implementation='auto',
  )
  opts.update(options)
  check_options(
    num_experts=opts['num_experts'],
    routing_name=opts['routing'],
    p=opts['p'],
    k=opts['k'],
    k_max=opts['k_max'],
    dispatch=opts['dispatch'],
    capacity_factor=opts['capacity_factor'],
    prefix=prefix,
  )
  for name, low in (('expert_frequency', 1), ('first_dense_layers', 0), ('num_shared_experts', 0)):
    v = opts[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f'{prefix}{name}={v!r} must be an int >= {low}')
  if opts.get('expert_d_ff') is not None:
    v = opts['expert_d_ff']
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f'{prefix}expert_d_ff={v!r} must be a positive int')
  return opts


@register_mlp('moe')
def _moe(config, layer_index: int, rngs: nnx.Rngs):
  opts = moe_layer_options(config.mlp_kwargs)
  if not is_moe_layer(
    layer_index,
    expert_frequency=opts.pop('expert_frequency'),
    first_dense_layers=opts.pop('first_dense_layers'),
  ):
    return MLP_REGISTRY['swiglu'](config, layer_index, rngs)
  expert_d_ff = opts.pop('expert_d_ff', None) or config.d_ff
  return MoE(
    config.d_model,
    expert_d_ff=expert_d_ff,
    std=config.init_std,
    out_std=config.out_init_std,
    param_dtype=config.weight_dtype,
    dtype=config.compute_dtype,
    rngs=rngs,
    **opts,
  )
