"""Mixture-of-Experts feed-forward: config, router, dispatch strategies and the NNX layer
(`model.mlp='moe'`, options in `model.mlp_options`, validated once by `MoEConfig`).

`moe_ffn(x[T,d], router_w[d,E], w1[E,d,f], w3[E,d,f], w2[E,f,d], cfg)` is the pure function:
router logits and softmax in float32, Top-K or dynamic Top-P selection (`kuaijax.routing`, or the
fused `pallas_kernels.topp_router` with `router_impl='fused'`), SwiGLU experts
`E_i(x) = W2_i (silu(W1_i x) * (W3_i x))`, output `sum_{kept i} g_i E_i(x)` with the raw routing
weights g (renormalised only when asked, Top-K style), plus optional always-on shared experts
(DeepSeekMoE). It returns `(y[T,d], aux)`; aux holds the auxiliary losses and routing stats.

Top-P is uncapped by default (`k_max=0`): every expert whose exclusive cumulative probability is
<= p is used, exactly as in the paper. `k_max > 0` caps the set at k_max experts (counted in aux
'trunc_rate').

Dispatch strategies (exact unless 'capacity' drops, which it counts; tested against each other):
- 'tiled': one loop over row tiles of the selected (token, expert) pairs, each tile gathered from
  x, run through its expert's whole SwiGLU and scatter-added into y (`dispatch.tiled_ffn`): no
  [pairs, d] buffer, the loops run as many tiles as the selection needs, one program for every
  selection; the forward keeps the experts' input projections of the first T *
  `saved_rows_per_token` selected rows, the backward reads them and recomputes the rest. Built for
  XLA:CPU, where small GEMMs in loops run near full speed; on GPU/TPU the loops would serialise.
- 'dropless': the selected (token, expert) pairs are counting-sorted by expert into a buffer whose
  size is the number of selected pairs rounded up to one of a few static sizes
  (`dispatch.bucketed`), then grouped matmuls (`pallas_kernels.gmm`: the Pallas kernel on GPU/TPU,
  a loop of row tiles over the real rows on CPU) and a weighted scatter-add back to tokens. Compute
  and the memory touched follow the selected pairs, not k_max; the backward pass recomputes the
  experts' forward when there is more than one bucket (Top-P).
- 'capacity': C = ceil(capacity_factor * T * K / E) rows per expert (K: k, or k_max / E for
  Top-P); the lowest-weight assignments of an overfull expert are dropped (aux 'drop_rate').
- 'dense': every expert on every token, masked by the gates (three big GEMMs): exact, but it
  computes unselected experts; the reference.
- 'auto': 'dense' only when every expert is selected by construction (Top-K with k = E); else
  'tiled' on CPU and 'dropless' on GPU/TPU (the faster exact strategy of each backend, measured
  by experiments/bench_moe.py on CPU; GPU: pallas_kernels/gpu_check.sh). It never picks 'dense'
  for Top-P and never 'capacity' (not exact).

Expert parallelism (experts sharded over the mesh axis 'expert') lives in
`kuaijax.models.expert_parallel`; the layer uses it whenever the current mesh
(`kuaijax.parallel.axis_rules`) has an 'expert' axis larger than 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from kuaijax import parallel
from kuaijax import routing as routing_lib
from kuaijax.models import dispatch as dispatch_lib
from kuaijax.models import expert_parallel
from kuaijax.models.layers import MLP_REGISTRY, adapted, param, register_mlp
from pallas_kernels.topp_router import topp_router

ROUTINGS = ('top_k', 'top_p')
DISPATCHES = ('auto', 'dense', 'capacity', 'dropless', 'tiled')
ROUTER_IMPLS = ('jnp', 'fused')
GMM_IMPLEMENTATIONS = ('auto', 'xla', 'pallas', 'interpret', 'ragged_dot')


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, int | float) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """The MoE layer's options (`model.mlp_options`); validated on construction.

  num_experts: routed experts E. expert_d_ff: width of each expert (0: the model's d_ff).
  routing: 'top_p' (the paper) or 'top_k'. p: Top-P threshold in (0, 1]. k: Top-K experts.
  k_max: Top-P cap on experts per token; 0 = uncapped (exact Top-P, the default).
  renormalize: divide the kept weights by their sum (Top-K style; the paper's Top-P does not).
  dispatch: 'auto' | 'dropless' | 'capacity' | 'dense' (module docstring).
  capacity_factor: buffer size of the 'capacity' strategy (also of the expert-parallel exchange
  with dispatch='capacity'); unused by the exact strategies.
  num_shared_experts: always-on shared experts of width expert_d_ff (DeepSeekMoE).
  expert_frequency / first_dense_layers: layers first_dense_layers, + expert_frequency, ... are MoE.
  gmm_implementation: the grouped matmul of 'dropless' ('auto' | 'xla' | 'pallas' | 'interpret'
  of pallas_kernels.gmm, or 'ragged_dot': jax.lax.ragged_dot).
  router_impl: 'jnp' (kuaijax.routing) or 'fused' (pallas_kernels.topp_router; Top-P only).
  saved_rows_per_token: 'tiled' keeps the experts' input projections of the first T * this many
  selected rows for the backward pass and recomputes the rest (0: recompute all; the memory of
  saved rows is reserved whatever the selection). 2 covers Top-2 and a converged Top-P router.
  """

  num_experts: int
  expert_d_ff: int = 0
  routing: str = 'top_p'
  p: float = 0.4
  k: int = 2
  k_max: int = 0
  renormalize: bool = False
  dispatch: str = 'auto'
  capacity_factor: float = 1.25
  num_shared_experts: int = 0
  expert_frequency: int = 1
  first_dense_layers: int = 0
  gmm_implementation: str = 'auto'
  router_impl: str = 'jnp'
  saved_rows_per_token: float = 2.0

  def __post_init__(self):
    e = self.num_experts
    pre = 'model.mlp_options.'
    if not _is_int(e) or e < 1:
      raise ValueError(f'{pre}num_experts={e!r} must be a positive int')
    for name, allowed in (
      ('routing', ROUTINGS),
      ('dispatch', DISPATCHES),
      ('router_impl', ROUTER_IMPLS),
      ('gmm_implementation', GMM_IMPLEMENTATIONS),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(f'{pre}{name}={getattr(self, name)!r} is not one of {list(allowed)}')
    if not _is_number(self.p) or not 0.0 < self.p <= 1.0:
      raise ValueError(f'{pre}p={self.p!r} must be a number in (0, 1]')
    if not _is_int(self.k) or not 1 <= self.k <= e:
      raise ValueError(f'{pre}k={self.k!r} must be an int in [1, {e}] (num_experts)')
    if not _is_int(self.k_max) or not 0 <= self.k_max <= e:
      raise ValueError(f'{pre}k_max={self.k_max!r} must be an int in [0, {e}] (0: uncapped)')
    if not _is_number(self.capacity_factor) or not self.capacity_factor > 0:
      raise ValueError(f'{pre}capacity_factor={self.capacity_factor!r} must be a number > 0')
    if not _is_number(self.saved_rows_per_token) or self.saved_rows_per_token < 0:
      raise ValueError(
        f'{pre}saved_rows_per_token={self.saved_rows_per_token!r} must be a number >= 0'
      )
    for name, low in (
      ('expert_d_ff', 0),
      ('num_shared_experts', 0),
      ('expert_frequency', 1),
      ('first_dense_layers', 0),
    ):
      v = getattr(self, name)
      if not _is_int(v) or v < low:
        raise ValueError(f'{pre}{name}={v!r} must be an int >= {low}')
    if not isinstance(self.renormalize, bool):
      raise ValueError(f'{pre}renormalize={self.renormalize!r} must be a bool')
    if self.router_impl == 'fused' and self.routing != 'top_p':
      raise ValueError(f"{pre}router_impl='fused' needs routing='top_p', got {self.routing!r}")

  @classmethod
  def from_options(cls, options: Mapping) -> MoEConfig:
    """From `model.mlp_options` (a mapping), naming unknown or missing keys."""
    options = dict(options)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
      raise ValueError(f'model.mlp_options has unknown keys {unknown}; known: {sorted(fields)}')
    if 'num_experts' not in options:
      raise ValueError('model.mlp_options.num_experts is required for model.mlp="moe"')
    return cls(**options)

  @property
  def slots(self) -> int:
    """Routing slots per token: k for Top-K, k_max (E when uncapped) for Top-P."""
    if self.routing == 'top_k':
      return self.k
    return self.k_max or self.num_experts

  @property
  def strategy(self) -> str:
    """The dispatch that runs: 'auto' resolved for the current backend (module docstring)."""
    if self.dispatch != 'auto':
      return self.dispatch
    if self.routing == 'top_k' and self.k == self.num_experts:
      return 'dense'
    return 'tiled' if jax.default_backend() == 'cpu' else 'dropless'

  def is_moe_layer(self, layer_index: int) -> bool:
    """Layers first_dense_layers, first_dense_layers + n, ... are MoE (n = expert_frequency)."""
    if layer_index < self.first_dense_layers:
      return False
    return (layer_index - self.first_dense_layers) % self.expert_frequency == 0


# ----------------------------------------------------------------------------- building blocks


def swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
  """Dense SwiGLU `(silu(x w1) * (x w3)) w2` for x [T, d] (shared experts, dense baselines)."""
  return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2


def expert_capacity(capacity_factor: float, tokens: int, slots: int, num_experts: int) -> int:
  """Rows per expert of the 'capacity' strategy (at most `tokens`: a token picks an expert once)."""
  return max(1, min(tokens, math.ceil(capacity_factor * tokens * slots / num_experts)))


# ----------------------------------------------------------------------------- strategies
# Each strategy: (x[T,d], weights[T,K] f32, ids[T,K] int32 (sentinel E), w1, w3, w2, *, min_rows,
# capacity_factor, gmm_implementation, grouped_matmul) -> (y[T,d] in x.dtype, dropped int32).


def dispatch_dense(x, weights, ids, w1, w3, w2, **_):
  """Every expert on every token; gates [T, E] scale the hidden units before W2."""
  num_experts, d, f = w1.shape
  tokens = x.shape[0]
  gates = jnp.zeros((tokens, num_experts + 1), jnp.float32)
  gates = gates.at[jnp.arange(tokens)[:, None], ids].set(weights)[:, :num_experts]
  w13 = jnp.concatenate([w1, w3], axis=2).transpose(1, 0, 2).reshape(d, num_experts * 2 * f)
  h = (x @ w13).reshape(tokens, num_experts, 2, f)
  h = jax.nn.silu(h[:, :, 0]) * h[:, :, 1] * gates[:, :, None].astype(x.dtype)
  y = h.reshape(tokens, num_experts * f) @ w2.reshape(num_experts * f, d)
  return y, jnp.zeros((), jnp.int32)


def dispatch_dropless(
  x, weights, ids, w1, w3, w2, *, min_rows=None, gmm_implementation='auto', grouped_matmul=None, **_
):
  """Pairs counting-sorted by expert into a bucketed buffer, grouped matmuls, weighted combine.

  min_rows: the fewest pairs a selection can have (T for Top-P, T * k for Top-K: one bucket).
  grouped_matmul: optional `fn(lhs[m,k], rhs[G,k,n], group_sizes[G]) -> [m,n]` replacing gmm
  (benchmark baselines such as `jax.lax.ragged_dot`).
  """
  tokens, slots = ids.shape
  sizes, positions = dispatch_lib.group_positions(ids, w1.shape[0])
  matmul = dispatch_lib.grouped_matmul(x.dtype, gmm_implementation, grouped_matmul)
  buckets = dispatch_lib.bucket_sizes(min_rows or tokens, tokens * slots)
  y = dispatch_lib.bucketed(
    jnp.sum(sizes),
    buckets,
    functools.partial(dispatch_lib.ffn_rows, matmul=matmul),
    x,
    weights,
    positions,
    sizes,
    w1,
    w3,
    w2,
  )
  return y, jnp.zeros((), jnp.int32)


def dispatch_capacity(x, weights, ids, w1, w3, w2, *, capacity_factor=1.25, **_):
  """A [E, C] buffer per expert; the lowest-weight assignments of an overfull expert are dropped."""
  tokens, slots = ids.shape
  num_experts, d, _ = w1.shape
  cap = expert_capacity(capacity_factor, tokens, slots, num_experts)
  slot, _, dropped = dispatch_lib.capacity_slots(
    ids.reshape(-1), weights.reshape(-1), num_experts, cap
  )
  token, weight = dispatch_lib.rows_of(num_experts * cap, slot.reshape(tokens, slots), weights)
  xb = dispatch_lib.gather_rows(x, token).reshape(num_experts, cap, d)
  h1 = jnp.einsum('ecd,edf->ecf', xb, w1)
  h3 = jnp.einsum('ecd,edf->ecf', xb, w3)
  out = jnp.einsum('ecf,efd->ecd', jax.nn.silu(h1) * h3, w2).reshape(num_experts * cap, d)
  return dispatch_lib.combine_rows(out, token, weight, tokens, x.dtype), dropped


def dispatch_tiled(x, weights, ids, w1, w3, w2, *, saved_rows=0, **_):
  """The whole SwiGLU per row tile of the selected pairs, in loops (`dispatch.tiled_ffn`)."""
  sizes, positions = dispatch_lib.group_positions(ids, w1.shape[0])
  y = dispatch_lib.tiled_ffn(x, weights, positions, sizes, w1, w3, w2, saved_rows)
  return y, jnp.zeros((), jnp.int32)


STRATEGIES = {
  'dense': dispatch_dense,
  'capacity': dispatch_capacity,
  'dropless': dispatch_dropless,
  'tiled': dispatch_tiled,
}


# ----------------------------------------------------------------------------- the pure layer


def route(x, router_w, cfg: MoEConfig):
  """Float32 router: (logits[T,E], probs[T,E], weights[T,K], ids[T,K], truncated[T])."""
  num_experts = router_w.shape[1]
  if cfg.routing == 'top_k':
    logits = x.astype(jnp.float32) @ router_w.astype(jnp.float32)
    probs = routing_lib.router_probs(logits)
    weights, ids = routing_lib.top_k(probs, k=cfg.k, renormalize=cfg.renormalize)
    return logits, probs, weights, ids, jnp.zeros(x.shape[:1], bool)
  if cfg.router_impl == 'fused':
    weights, ids, _, logits = topp_router(x, router_w, p=cfg.p, k_max=cfg.slots)
    probs = routing_lib.router_probs(logits)
  else:
    logits = x.astype(jnp.float32) @ router_w.astype(jnp.float32)
    probs = routing_lib.router_probs(logits)
    weights, ids = routing_lib.top_p(probs, p=cfg.p, k_max=cfg.slots)
  # Cut by k_max iff the next expert would be kept: the kept mass is still <= p (module routing).
  truncated = (jnp.sum(weights, axis=-1) <= cfg.p) & (cfg.slots < num_experts)
  if cfg.renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return logits, probs, weights, ids, truncated


def moe_ffn(
  x: jax.Array,
  router_w: jax.Array,
  w1: jax.Array,
  w3: jax.Array,
  w2: jax.Array,
  cfg: MoEConfig,
  *,
  shared: tuple[jax.Array, jax.Array, jax.Array] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  grouped_matmul=None,
) -> tuple[jax.Array, dict]:
  """MoE SwiGLU feed-forward over tokens x [T, d]; see the module docstring.

  shared: optional (w1 [d, fs], w3 [d, fs], w2 [fs, d]) of the always-on shared experts.
  mesh: a mesh with an 'expert' axis > 1 switches to expert parallelism (tokens sharded over the
  mesh's batch axes, experts over 'expert').
  grouped_matmul: replaces gmm in 'dropless' (see dispatch_dropless).
  Returns y [T, d] (x.dtype) and aux: 'balance_loss', 'entropy_loss', 'router_z_loss', 'mean_k',
  'max_k', 'drop_rate', 'trunc_rate' (scalars), 'k_hist' [K+1], 'expert_load' [E],
  'experts_per_token' [T].
  """
  num_experts = cfg.num_experts
  if x.ndim != 2 or router_w.shape != (x.shape[1], num_experts):
    raise ValueError(
      f'moe_ffn: need x [T, d] and router_w [d, E={num_experts}], got {x.shape}, {router_w.shape}'
    )
  e, d, f = w1.shape if w1.ndim == 3 else (None, None, None)
  if e != num_experts or d != x.shape[1] or w3.shape != w1.shape or w2.shape != (e, f, d):
    raise ValueError(
      f'moe_ffn: need w1, w3 [E={num_experts}, d, f] and w2 [E, f, d], got '
      f'{w1.shape}, {w3.shape}, {w2.shape}'
    )
  dt = x.dtype
  w1, w3, w2 = (w.astype(dt) for w in (w1, w3, w2))
  logits, probs, weights, ids, truncated = route(x, router_w, cfg)
  options = dict(
    min_rows=x.shape[0] * (cfg.k if cfg.routing == 'top_k' else 1),
    capacity_factor=cfg.capacity_factor,
    gmm_implementation=cfg.gmm_implementation,
    grouped_matmul=grouped_matmul,
    saved_rows=math.ceil(x.shape[0] * cfg.saved_rows_per_token),
  )
  if mesh is not None and mesh.shape.get('expert', 1) > 1:
    y, dropped = expert_parallel.expert_parallel_ffn(
      x, weights, ids, w1, w3, w2, mesh=mesh, capacity=cfg.strategy == 'capacity', **options
    )
  else:
    y, dropped = STRATEGIES[cfg.strategy](x, weights, ids, w1, w3, w2, **options)
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


class MoE(nnx.Module):
  """Router (float32) + stacked SwiGLU experts [E, d, f] / [E, f, d] + optional shared experts.

  `cfg.expert_d_ff` must be resolved (> 0) here; the model factory fills in the model's d_ff.
  LoRA adapters of the experts are per-expert pairs, merged into the stacked weights before the
  dispatch, which stays the same.
  """

  LINEAR_WEIGHTS = {name: 1 for name in ('w1', 'w3', 'w2', 'shared_w1', 'shared_w3', 'shared_w2')}

  def __init__(
    self,
    dim: int,
    cfg: MoEConfig,
    *,
    std: float,
    out_std: float,
    param_dtype=jnp.float32,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if cfg.expert_d_ff < 1:
      raise ValueError(f'MoE: expert_d_ff={cfg.expert_d_ff} must be resolved to a positive int')
    self.cfg = cfg  # frozen and hashable: NNX graphdefs stay usable as jit static args
    self.dtype = dtype
    e, f = cfg.num_experts, cfg.expert_d_ff
    self.router = param(rngs, (dim, e), ('embed', 'expert'), std=std, dtype=jnp.float32)
    self.w1 = param(rngs, (e, dim, f), ('expert', 'embed', 'mlp'), std=std, dtype=param_dtype)
    self.w3 = param(rngs, (e, dim, f), ('expert', 'embed', 'mlp'), std=std, dtype=param_dtype)
    self.w2 = param(rngs, (e, f, dim), ('expert', 'mlp', 'embed'), std=out_std, dtype=param_dtype)
    if cfg.num_shared_experts:
      fs = cfg.num_shared_experts * f  # the sum of s SwiGLUs is one SwiGLU with s times the width
      self.shared_w1 = param(rngs, (dim, fs), ('embed', 'mlp'), std=std, dtype=param_dtype)
      self.shared_w3 = param(rngs, (dim, fs), ('embed', 'mlp'), std=std, dtype=param_dtype)
      self.shared_w2 = param(rngs, (fs, dim), ('mlp', 'embed'), std=out_std, dtype=param_dtype)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
    lead, d = x.shape[:-1], x.shape[-1]
    shared = None
    if self.cfg.num_shared_experts:
      shared = tuple(adapted(self, f'shared_{name}') for name in ('w1', 'w3', 'w2'))
    current = parallel.current_axis_rules()
    mesh = current[0] if current is not None else None
    y, aux = moe_ffn(
      x.astype(self.dtype).reshape(-1, d),
      self.router[...],
      adapted(self, 'w1'),
      adapted(self, 'w3'),
      adapted(self, 'w2'),
      self.cfg,
      shared=shared,
      mesh=mesh,
    )
    aux['experts_per_token'] = aux['experts_per_token'].reshape(lead)
    return y.reshape(*lead, d), aux


@register_mlp('moe')
def _moe(config, layer_index: int, rngs: nnx.Rngs):
  cfg = MoEConfig.from_options(config.mlp_kwargs)
  if not cfg.is_moe_layer(layer_index):
    return MLP_REGISTRY['swiglu'](config, layer_index, rngs)
  if not cfg.expert_d_ff:
    cfg = dataclasses.replace(cfg, expert_d_ff=config.d_ff)
  return MoE(
    config.d_model,
    cfg,
    std=config.init_std,
    out_std=config.out_init_std,
    param_dtype=config.weight_dtype,
    dtype=config.compute_dtype,
    rngs=rngs,
  )
