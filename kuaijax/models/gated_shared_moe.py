"""MoE feed-forward plus one sigmoid-gated shared expert (Qwen2-MoE style), `model.mlp='moe_gated_shared'`.

y = MoE(x) + sigmoid(x . g) * SwiGLU_shared(x), with g [d] a learned gate and the shared SwiGLU of
width `model.mlp_options.shared_d_ff`. Every other `mlp_options` key is an option of the 'moe' layer
(kuaijax/models/moe.py), which builds the routed part (and the plain SwiGLU of dense layers, which
then get no shared expert).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from kuaijax.models.layers import MLP_REGISTRY, SwiGLU, dense, param, register_mlp
from kuaijax.models.moe import MoE


class GatedSharedMoE(nnx.Module):
  """Routed MoE + sigmoid-gated shared SwiGLU expert."""

  def __init__(self, moe: MoE, config, shared_d_ff: int, *, rngs: nnx.Rngs):
    self.moe = moe
    self.shared = SwiGLU(
      config.d_model,
      shared_d_ff,
      std=config.init_std,
      out_std=config.out_init_std,
      param_dtype=config.weight_dtype,
      dtype=config.compute_dtype,
      rngs=rngs,
    )
    self.gate = param(
      rngs, (config.d_model, 1), ('embed', None), std=config.init_std, dtype=config.weight_dtype
    )

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
    y, aux = self.moe(x)
    shared, _ = self.shared(x)
    g = jax.nn.sigmoid(dense(x, self.gate[...].astype(x.dtype)))
    return y + g * shared, aux


@register_mlp('moe_gated_shared')
def _moe_gated_shared(config, layer_index: int, rngs: nnx.Rngs):
  options = dict(config.mlp_kwargs)
  shared_d_ff = options.pop('shared_d_ff', None)
  if isinstance(shared_d_ff, bool) or not isinstance(shared_d_ff, int) or shared_d_ff < 1:
    raise ValueError(f'model.mlp_options.shared_d_ff={shared_d_ff!r} must be a positive int')
  inner = dataclasses.replace(config, mlp='moe', mlp_options=options)
  moe = MLP_REGISTRY['moe'](inner, layer_index, rngs)
  if not isinstance(moe, MoE):
    return moe  # a dense layer of the stack (expert_frequency / first_dense_layers)
  return GatedSharedMoE(moe, config, shared_d_ff, rngs=rngs)
