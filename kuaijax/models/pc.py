"""Layer stacks chosen by config: vanilla, ODE Transformer (RK2, gated RK2, RK4) and PCformer.

Method notes: experiments/pcformer/README.md. `G_i` is the WHOLE pre-norm block i including its residuals
(G(x) = x + attn + mlp), and every RK stage of a layer reuses layer i's weights.

- `vanilla`:        x_i = G_i(x).
- `ode_rk2`:        F1 = G(x), F2 = G(x + F1); x_i = x + (F1 + F2) / 2.
- `ode_rk2_gated`:  g = sigmoid(W_g [F1; F2] + b_g) per token; x_i = x + g F1 + (1 - g) F2.
- `ode_rk4`:        F1 = G(x), F2 = G(x + F1/2), F3 = G(x + F2/2), F4 = G(x + F3);
                    x_i = x + (F1 + 2 F2 + 2 F3 + F4) / 6.
- `pc_rk2|pc_rk4`:  predictor: the same RK stages with a LayerNorm per stage (LNrk_j, shared by all
                    layers) applied to each stage output, combined with EMA weights
                    P = x + sum_j alpha (1 - alpha)^(n - j) F_j; corrector over the history
                    H = [h_0 = embeddings, ...]: H.append(LNp_i(P)); z = sum_k W[i, k] H[k];
                    H[i] = LNc_i(G_i(z)); x_i = sum_k Wc[i, k] H[k]. W and Wc are (L+1)x(L+1)
                    lower-triangular, initialised to rows of 1/(i+1).

The update rules are pure functions of a block function `g(j, x)` (j = the evaluation index inside
the layer) so they can be checked against hand-computed values with a linear map; `LayerStack` holds
the extra parameters and runs one layer of the stack around a real block.

Block evaluations per layer and token (forward compute multiplier vs vanilla): vanilla 1, ode_rk2
and ode_rk2_gated 2, ode_rk4 4, pc_rk2 3, pc_rk4 5. Training activations kept for the backward pass
grow by the same factor unless the layer is rematerialised (`model.remat`), in which case only the
layer input and the PC history are kept (the history, L+1 hidden states, is kept anyway) and the
backward pass recomputes the layer's evaluations once (training compute x4/3).

KV cache (decoding), `model.pc_cache`:
- 'corrector' (the spec / released LM): one cache per layer. Every evaluation but the layer's last
  attends to the cached past plus its own current keys/values without writing; the last evaluation
  (the corrector of a PC layer, the last RK stage of an ODE layer) writes. A prefill equals the full
  forward pass; later tokens' predictor stages see the corrector's keys of earlier tokens, not their
  own stage's, so decoding does not reproduce the training forward pass exactly (nor does the
  released code).
- 'per_stage': one cache per layer and evaluation, each evaluation writing its own; decoding
  equals the full forward pass exactly, at `evaluations` times the cache memory.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax.models.layers import param

ALPHA_TYPES = ('scalar', 'per_layer', 'per_channel')
CACHE_MODES = ('corrector', 'per_stage')
RK_ORDERS = (2, 4)
STACK_NAMES = ('vanilla', 'ode_rk2', 'ode_rk2_gated', 'ode_rk4', 'pc_rk2', 'pc_rk4')

BlockFn = Callable[[int, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class StackSpec:
  """A parsed `model.stack` name: kind ('vanilla' | 'ode' | 'pc'), RK order, gated RK2."""

  kind: str
  order: int = 1
  gated: bool = False

  @property
  def evaluations(self) -> int:
    """Block evaluations per layer and token: RK stages (+1 corrector for PC)."""
    return self.order + (self.kind == 'pc')


def parse_stack(name: str) -> StackSpec:
  """'vanilla' | 'ode_rk{2,4}' | 'ode_rk2_gated' | 'pc_rk{2,4}' -> StackSpec (clear errors)."""
  if name == 'vanilla':
    return StackSpec('vanilla')
  match = re.fullmatch(r'(ode|pc)_rk(\d+)(_gated)?', str(name))
  if not match:
    raise ValueError(f'model.stack={name!r} is not a known layer stack; known: {list(STACK_NAMES)}')
  kind, order, gated = match.group(1), int(match.group(2)), bool(match.group(3))
  if order not in RK_ORDERS:
    raise ValueError(
      f'model.stack={name!r}: RK order {order} is not supported; orders: {list(RK_ORDERS)}'
    )
  if gated and (kind != 'ode' or order != 2):
    raise ValueError(f'model.stack={name!r}: the gate exists only for ode_rk2 (ode_rk2_gated)')
  return StackSpec(kind, order, gated)


# ---------------------------------------------------------------- pure update rules


def rk_stages(
  g: BlockFn, x: jax.Array, order: int, stage_norms: Sequence[Callable] | None = None
) -> list[jax.Array]:
  """The RK stages F_1..F_order of one layer; `stage_norms[j]` (PC: LNrk_j) normalises stage j.

  Stage inputs: RK2 x, x + F1; RK4 x, x + F1/2, x + F2/2, x + F3 (with the normalised F's).
  """
  if order not in RK_ORDERS:
    raise ValueError(f'RK order {order} is not supported; orders: {list(RK_ORDERS)}')
  steps = (1.0,) if order == 2 else (0.5, 0.5, 1.0)
  stages, inp = [], x
  for j in range(order):
    f = g(j, inp)
    if stage_norms is not None:
      f = stage_norms[j](f)
    stages.append(f)
    if j < order - 1:
      inp = x + steps[j] * f
  return stages


def rk2_update(x, f1, f2):
  """Plain RK2 (Heun): x + (F1 + F2) / 2."""
  return x + 0.5 * (f1 + f2)


def rk2_gate(f1, f2, w, b):
  """Per-token gate sigmoid(W_g [F1; F2] + b_g), shape [..., 1]; w [2d], b scalar."""
  both = jnp.concatenate([f1, f2], axis=-1).astype(jnp.float32)
  return jax.nn.sigmoid(both @ w.astype(jnp.float32) + b.astype(jnp.float32))[..., None]


def gated_rk2_update(x, f1, f2, w, b):
  """Gated RK2 (ODE Transformer): x + g F1 + (1 - g) F2 with g = rk2_gate(F1, F2)."""
  g = rk2_gate(f1, f2, w, b).astype(x.dtype)
  return x + g * f1 + (1 - g) * f2


def rk4_update(x, f1, f2, f3, f4):
  """Classical RK4: x + (F1 + 2 F2 + 2 F3 + F4) / 6."""
  return x + (f1 + 2 * f2 + 2 * f3 + f4) / 6


def ode_step(g: BlockFn, x, order: int, gate: tuple | None = None):
  """One ODE Transformer layer: RK2 (gated when `gate` = (w, b)) or RK4 over block function g."""
  stages = rk_stages(g, x, order)
  if order == 4:
    if gate is not None:
      raise ValueError('the learnable gate exists only for RK2')
    return rk4_update(x, *stages)
  return rk2_update(x, *stages) if gate is None else gated_rk2_update(x, *stages, *gate)


def ema_coefficients(alpha, order: int) -> list:
  """EMA weights of stages 1..n: alpha (1 - alpha)^(n - j); the newest stage gets alpha."""
  return [alpha * (1 - alpha) ** (order - 1 - j) for j in range(order)]


def pc_predict(g: BlockFn, x, alpha, order: int, stage_norms: Sequence[Callable]):
  """PCformer predictor: P = x + sum_j alpha (1 - alpha)^(n - j) LNrk_j(F_j)."""
  stages = rk_stages(g, x, order, stage_norms)
  out = x
  for c, f in zip(ema_coefficients(alpha, order), stages, strict=True):
    out = out + jnp.asarray(c, jnp.float32).astype(x.dtype) * f
  return out


def multistep(row, history: Sequence[jax.Array]):
  """sum_k row[k] H[k] over the history entries present (row is one row of W or Wc)."""
  out = 0.0
  for k, h in enumerate(history):
    out = out + row[k].astype(h.dtype) * h
  return out


def pc_correct(g: BlockFn, pred, history: tuple, layer: int, w, wc, norm_p, norm_c, order: int):
  """PCformer corrector of layer `layer` (1-based): returns (x_i, history with H[i] = LNc_i(G(z)))."""
  history = (*history, norm_p(pred))
  if len(history) != layer + 1:
    raise ValueError(f'layer {layer} needs a history of {layer} entries, got {len(history) - 1}')
  z = multistep(w[layer], history)
  y = g(order, z)
  history = (*history[:-1], norm_c(y))
  return multistep(wc[layer], history), history


def pc_layer(
  g: BlockFn, x, history: tuple, layer: int, *, alpha, w, wc, order, stage_norms, norm_p, norm_c
):
  """One PCformer layer (predictor + corrector): (x_{i-1}, H) -> (x_i, H)."""
  pred = pc_predict(g, x, alpha, order, stage_norms)
  return pc_correct(g, pred, history, layer, w, wc, norm_p, norm_c, order)


def init_multistep(num_layers: int) -> np.ndarray:
  """(L+1)x(L+1) lower-triangular matrix with rows 1/(i+1) (the spec's W and Wc init)."""
  n = num_layers + 1
  tri = np.tril(np.ones((n, n), np.float32))
  return tri / tri.sum(axis=1, keepdims=True)


def pack_tril(matrix) -> jax.Array:
  """Lower-triangular entries (row-major) of a square matrix as a vector."""
  rows, cols = np.tril_indices(matrix.shape[0])
  return jnp.asarray(matrix)[rows, cols]


def unpack_tril(packed: jax.Array, n: int) -> jax.Array:
  """Square [n, n] matrix from its packed lower triangle; the upper triangle is exactly 0."""
  rows, cols = np.tril_indices(n)
  return jnp.zeros((n, n), packed.dtype).at[rows, cols].set(packed)


# ---------------------------------------------------------------- NNX modules


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias (the PC stage / history norms), computed in float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, (dim,), ('norm',), init='ones', dtype=param_dtype)
    self.bias = param(rngs, (dim,), ('norm',), init='zeros', dtype=param_dtype)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class RK2Gate(nnx.Module):
  """W_g [2d] and b_g of one gated-RK2 layer (2d -> 1 per token)."""

  def __init__(self, d_model: int, init_std: float, param_dtype, rngs: nnx.Rngs):
    self.w = param(rngs, (2 * d_model,), ('norm',), std=init_std, dtype=param_dtype)
    self.b = param(rngs, (), (), init='zeros', dtype=param_dtype)


def _mean_aux(auxes: list[dict]) -> dict:
  """Elementwise mean of the per-evaluation aux dicts of one layer."""
  return jax.tree.map(lambda *a: sum(a) / len(a), *auxes)


class LayerStack(nnx.Module):
  """The extra parameters of a stack and the per-layer update around the layer's block.

  Parameters: ODE gated RK2: per layer `gates[i]` (w [2d], b); PC: `alpha` (one scalar, one per
  layer, or one [d] vector per layer), `stage_norms` (one LayerNorm per RK stage, shared by all
  layers), `pred_norms` / `corr_norms` (LNp_i / LNc_i per layer) and `w` / `wc`, the multistep
  matrices stored as their packed lower triangles (so the upper triangle is masked by construction
  and the matrices are not weight-decayed; `matrices()` returns them square).
  """

  def __init__(
    self,
    spec: StackSpec,
    *,
    num_layers: int,
    d_model: int,
    alpha_type: str = 'scalar',
    alpha_init: float = 0.5,
    cache_mode: str = 'corrector',
    eps: float = 1e-6,
    init_std: float = 0.02,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if alpha_type not in ALPHA_TYPES:
      raise ValueError(f'model.pc_alpha={alpha_type!r} is not one of {list(ALPHA_TYPES)}')
    if cache_mode not in CACHE_MODES:
      raise ValueError(f'model.pc_cache={cache_mode!r} is not one of {list(CACHE_MODES)}')
    self.spec, self.num_layers = spec, num_layers
    self.alpha_type, self.cache_mode = alpha_type, cache_mode
    if spec.gated:
      self.gates = nnx.List(
        [RK2Gate(d_model, init_std, param_dtype, rngs) for _ in range(num_layers)]
      )
    if spec.kind == 'pc':

      def alpha_param(shape, axes):
        return nnx.Param(jnp.full(shape, alpha_init, param_dtype), logical_axes=axes)

      if alpha_type == 'scalar':
        self.alpha = alpha_param((), ())
      else:
        shape, axes = ((), ()) if alpha_type == 'per_layer' else ((d_model,), ('norm',))
        self.alpha = nnx.List([alpha_param(shape, axes) for _ in range(num_layers)])
      norm = lambda: LayerNorm(d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)
      self.stage_norms = nnx.List([norm() for _ in range(spec.order)])
      self.pred_norms = nnx.List([norm() for _ in range(num_layers)])
      self.corr_norms = nnx.List([norm() for _ in range(num_layers)])
      init = pack_tril(init_multistep(num_layers)).astype(param_dtype)
      self.w = nnx.Param(init, logical_axes=('layers',))
      self.wc = nnx.Param(init, logical_axes=('layers',))

  @property
  def caches_per_layer(self) -> int:
    return self.spec.evaluations if self.cache_mode == 'per_stage' else 1

  def layer_alpha(self, i: int) -> jax.Array:
    """alpha of layer i (0-based): a scalar, or a [d] vector for per-channel alpha."""
    return self.alpha[...] if self.alpha_type == 'scalar' else self.alpha[i][...]

  def matrices(self) -> tuple[jax.Array, jax.Array]:
    """(W, Wc) as square (L+1)x(L+1) lower-triangular matrices."""
    n = self.num_layers + 1
    return unpack_tril(self.w[...], n), unpack_tril(self.wc[...], n)

  def init_history(self, x: jax.Array) -> tuple:
    """The PC history [h_0 = embeddings]; empty for the other stacks."""
    return (x,) if self.spec.kind == 'pc' else ()

  def step(self, i: int, block, x, history: tuple, positions, segment_ids, caches=None):
    """Layer i (0-based): (x, history) -> (x, history, aux, caches).

    `block(x, positions, segment_ids, cache, commit=...) -> (y, aux, cache)` is layer i's block;
    `caches` are the layer's `caches_per_layer` KV caches (or None). `aux` is the elementwise mean
    of the block's feed-forward aux over the layer's evaluations.
    """
    n = self.spec.evaluations
    auxes, new_caches = [], None if caches is None else list(caches)

    def g(j: int, inp):
      if caches is None:
        y, aux, _ = block(inp, positions, segment_ids)
      elif self.cache_mode == 'per_stage':
        y, aux, new_caches[j] = block(inp, positions, segment_ids, caches[j])
      else:
        last = j == n - 1
        y, aux, cache = block(inp, positions, segment_ids, caches[0], commit=last)
        if last:
          new_caches[0] = cache
      auxes.append(aux)
      return y

    spec = self.spec
    if spec.kind == 'vanilla':
      x = g(0, x)
    elif spec.kind == 'ode':
      gate = (self.gates[i].w[...], self.gates[i].b[...]) if spec.gated else None
      x = ode_step(g, x, spec.order, gate)
    else:
      w, wc = self.matrices()
      x, history = pc_layer(
        g,
        x,
        history,
        i + 1,
        alpha=self.layer_alpha(i),
        w=w,
        wc=wc,
        order=spec.order,
        stage_norms=list(self.stage_norms),
        norm_p=self.pred_norms[i],
        norm_c=self.corr_norms[i],
      )
    return x, history, _mean_aux(auxes), new_caches
