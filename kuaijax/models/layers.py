"""Basic NNX layers with logical axis names: parameter helper, RMSNorm, embedding, SwiGLU MLP.

Linear weights are read through `linear` (x @ W) or `adapted` (W as an array): both apply the LoRA
adapter a weight may carry (`kuaijax.models.lora`, attached as the attribute `<name>_lora`), so a
module adapts any of the weights it lists in `LINEAR_WEIGHTS` ({name: number of input dims})
without code of its own.

The feed-forward block sits behind a tiny registry (`register_mlp` / `make_mlp`): a feed-forward
module is called as `y, aux = mlp(x)` where `aux` is a dict of scalars (empty for dense MLPs,
auxiliary losses and routing statistics for MoE layers), so an MoE layer can replace the dense MLP
in any layer without touching the transformer.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax.parallel import constrain
from kuaijax.registry import Registry


def param(
  rngs: nnx.Rngs,
  shape: Sequence[int],
  logical_axes: Sequence[str],
  *,
  std: float | None = None,
  dtype=jnp.float32,
  init: str = 'normal',
) -> nnx.Param:
  """A parameter drawn from N(0, std^2) (or ones/zeros) carrying its logical axis names."""
  if init == 'normal':
    value = std * jax.random.normal(rngs.params(), tuple(shape), dtype)
  elif init == 'ones':
    value = jnp.ones(tuple(shape), dtype)
  elif init == 'zeros':
    value = jnp.zeros(tuple(shape), dtype)
  else:
    raise ValueError(f'unknown init {init!r}')
  return nnx.Param(value, logical_axes=tuple(logical_axes))


def dense(x: jax.Array, w: jax.Array, contract_dims: int = 1) -> jax.Array:
  """Contracts the last `contract_dims` dims of x with the first ones of w as one 2-D matmul.

  Flattening to [tokens, in] @ [in, out] keeps XLA on its fastest GEMM path (on CPU the batched
  einsum forms ran 3-4x slower in the backward pass) and is layout-neutral on GPU/TPU.
  """
  in_shape, out_shape = w.shape[:contract_dims], w.shape[contract_dims:]
  lead = x.shape[: x.ndim - contract_dims]
  y = x.reshape(-1, int(np.prod(in_shape))) @ w.reshape(int(np.prod(in_shape)), -1)
  return y.reshape(*lead, *out_shape)


ADAPTER_SUFFIX = '_lora'  # the LoRA adapter of weight `w` is the attribute `w_lora`


def _adapter(module: nnx.Module, name: str):
  adapter = getattr(module, name + ADAPTER_SUFFIX, None)
  return adapter if adapter is not None and adapter.enabled else None


def linear(module: nnx.Module, name: str, x: jax.Array, dtype, contract_dims: int = 1) -> jax.Array:
  """x @ module.<name> (cast to `dtype`), plus its LoRA adapter's low-rank path when it has one."""
  y = dense(x, getattr(module, name)[...].astype(dtype), contract_dims)
  adapter = _adapter(module, name)
  return y if adapter is None else y + adapter(x, dtype)


def adapted(module: nnx.Module, name: str) -> jax.Array:
  """module.<name> as an array, with its LoRA update merged in (W + scale A B) when it has one:
  the form for weights consumed whole, such as stacked experts fed to an MoE dispatch."""
  w = getattr(module, name)[...]
  adapter = _adapter(module, name)
  if adapter is None:
    return w
  delta = adapter.delta()
  return w.astype(jnp.promote_types(w.dtype, delta.dtype)) + delta


class RMSNorm(nnx.Module):
  """Root-mean-square LayerNorm with a learned scale, computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, (dim,), ('norm',), init='ones', dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding table [vocab, embed]."""

  def __init__(self, vocab_size: int, dim: int, *, std: float, param_dtype, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(rngs, (vocab_size, dim), ('vocab', 'embed'), std=std, dtype=param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class SwiGLU(nnx.Module):
  """Dense SwiGLU feed-forward: W2 (silu(x W1) * (x W3))."""

  LINEAR_WEIGHTS = {'w1': 1, 'w3': 1, 'w2': 1}

  def __init__(
    self, dim: int, hidden: int, *, std: float, out_std: float, param_dtype, dtype, rngs: nnx.Rngs
  ):
    self.dtype = dtype
    self.w1 = param(rngs, (dim, hidden), ('embed', 'mlp'), std=std, dtype=param_dtype)
    self.w3 = param(rngs, (dim, hidden), ('embed', 'mlp'), std=std, dtype=param_dtype)
    self.w2 = param(rngs, (hidden, dim), ('mlp', 'embed'), std=out_std, dtype=param_dtype)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
    dt = self.dtype
    gate, up = linear(self, 'w1', x, dt), linear(self, 'w3', x, dt)
    h = constrain(jax.nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return linear(self, 'w2', h, dt), {}


# name -> factory(config, layer_index, rngs) returning a module called as `y, aux = mlp(x)`.
MLP_REGISTRY = Registry('feed-forward')
register_mlp = MLP_REGISTRY.register  # decorator: @register_mlp('name') def factory(...)


@register_mlp('swiglu')
def _swiglu(config, layer_index: int, rngs: nnx.Rngs) -> SwiGLU:
  del layer_index
  return SwiGLU(
    config.d_model,
    config.d_ff,
    std=config.init_std,
    out_std=config.out_init_std,
    param_dtype=config.weight_dtype,
    dtype=config.compute_dtype,
    rngs=rngs,
  )


def make_mlp(config, layer_index: int, rngs: nnx.Rngs):
  """Builds the feed-forward block of layer `layer_index` from `config.mlp`."""
  if config.mlp not in MLP_REGISTRY:
    raise ValueError(f'model.mlp={config.mlp!r} is not registered; known: {sorted(MLP_REGISTRY)}')
  return MLP_REGISTRY[config.mlp](config, layer_index, rngs)
