"""Decoder-only Transformer LM (pre-norm, RMSNorm, RoPE + GQA attention, pluggable feed-forward).

`TransformerConfig.from_config(config.model)` validates the model section of an experiment config;
`Transformer(cfg, rngs=...)` builds the NNX module. The forward pass takes packed batches
(`segment_ids`, `positions`) and, for decoding, the list of `KVCache`s from `init_caches` (one per
layer; one per layer and block evaluation when `model.pc_cache='per_stage'`).

`model.stack` picks how the blocks are composed (kuaijax/models/pc.py): 'vanilla', ODE Transformer
'ode_rk2' / 'ode_rk2_gated' / 'ode_rk4', or PCformer 'pc_rk2' / 'pc_rk4' (options `pc_alpha`,
`pc_alpha_init`, `pc_cache`). `model.rope_heads` picks single-base RoPE or HARPE per-head bases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kuaijax.config_lib import dataclass_from_section
from kuaijax.models import pc
from kuaijax.models.attention import Attention, KVCache
from kuaijax.models.layers import Embed, RMSNorm, adapted, dense, make_mlp, param
from kuaijax.parallel import constrain

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
ROPE_HEADS = ('single', 'ascending', 'descending', 'list')


def harpe_bases(
  strategy: str, num_heads: int, num_kv_heads: int, b_min=0.0, b_max=0.0, bases=(), base=1e4
) -> tuple[float, ...]:
  """One RoPE base per KV head (query heads of a GQA group share their KV head's base).

  'single': `base` everywhere; 'ascending' / 'descending': b_h = b_min + h (b_max - b_min)/(N-1)
  over the N KV heads (reversed for descending); 'list': `bases`, one per KV head, or one per query
  head when the heads of each GQA group carry the same value.
  """
  if strategy not in ROPE_HEADS:
    raise ValueError(f'model.rope_heads={strategy!r} is not one of {list(ROPE_HEADS)}')
  n = num_kv_heads
  if strategy == 'single':
    out = (float(base),) * n
  elif strategy == 'list':
    bases = tuple(float(b) for b in bases)
    group = num_heads // num_kv_heads
    if len(bases) == num_heads and group > 1:
      groups = [bases[i * group : (i + 1) * group] for i in range(n)]
      if any(len(set(g)) > 1 for g in groups):
        raise ValueError(
          f'model.rope_bases: query heads sharing a KV head must share its base (GQA groups of '
          f'{group}), got {bases}'
        )
      bases = tuple(g[0] for g in groups)
    if len(bases) != n:
      raise ValueError(
        f'model.rope_bases has {len(bases)} entries; expected num_heads={num_heads} or '
        f'num_kv_heads={num_kv_heads}'
      )
    out = bases
  else:
    if not 1.0 < b_min < b_max:
      raise ValueError(
        f'model.rope_heads={strategy!r} needs 1 < model.rope_b_min < model.rope_b_max, got '
        f'{b_min} and {b_max}'
      )
    step = (b_max - b_min) / (n - 1) if n > 1 else 0.0
    out = tuple(float(b_min + h * step) for h in range(n))
    if strategy == 'descending':
      out = out[::-1]
  if any(not b > 1.0 for b in out):
    raise ValueError(f'RoPE bases must be > 1, got {out}')
  return out


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the decoder LM; validated on construction."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  num_kv_heads: int | None = None  # None: multi-head attention (= num_heads)
  head_dim: int | None = None  # None: d_model // num_heads
  mlp: str = 'swiglu'
  mlp_options: Mapping[str, Any] = ()  # keyword options of the feed-forward factory
  tie_embeddings: bool = True
  init_std: float = 0.02
  out_init_std: float | None = None  # None: init_std / sqrt(2 * num_layers)
  rope_base: float = 10000.0
  rope_heads: str = 'single'  # 'single' | HARPE: 'ascending' | 'descending' | 'list'
  rope_b_min: float = 0.0  # HARPE uniform bases between rope_b_min and rope_b_max
  rope_b_max: float = 0.0
  rope_bases: tuple[float, ...] = ()  # HARPE 'list': one per head (or per KV head)
  # Llama-3 RoPE frequency scaling (factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings); () = none. Single-base RoPE only.
  rope_llama3_scaling: tuple[float, ...] = ()
  # YaRN: (factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor,
  # truncate 0/1); see attention.yarn_inv_freq.
  rope_yarn_scaling: tuple[float, ...] = ()
  qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
  qk_norm: bool = False  # RMSNorm over head_dim of queries and keys before RoPE (Qwen3)
  sliding_window: int = 0  # > 0: query i sees keys j with i - window < j <= i (Mistral); 0 = all
  stack: str = (
    'vanilla'  # see kuaijax/models/pc.py: vanilla|ode_rk2|ode_rk2_gated|ode_rk4|pc_rk2|pc_rk4
  )
  pc_alpha: str = 'scalar'  # PC EMA coefficient: 'scalar' | 'per_layer' | 'per_channel'
  pc_alpha_init: float = 0.5
  pc_cache: str = 'corrector'  # 'corrector' (only the corrector writes) | 'per_stage' (exact)
  attention_causal_blocks: int = 4  # query blocks whose above-diagonal key blocks are skipped
  norm_eps: float = 1e-6  # RMSNorm epsilon (block and final norms)
  pc_norm_eps: float = 1e-5  # LayerNorm epsilon of the PC stage / predictor / corrector norms
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'
  remat: str = 'none'

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'd_ff'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'model.{name} must be a positive int, got {value!r}')
    kv = self.num_kv_heads if self.num_kv_heads is not None else self.num_heads
    if kv <= 0 or self.num_heads % kv:
      raise ValueError(
        f'model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={kv}'
      )
    head_dim = self.head_dim
    if head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(
          f'model.d_model={self.d_model} is not divisible by '
          f'model.num_heads={self.num_heads}; set model.head_dim'
        )
      head_dim = self.d_model // self.num_heads
    if head_dim <= 0 or head_dim % 2:
      raise ValueError(f'model.head_dim={head_dim} must be a positive even int (RoPE)')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'model.{name}={getattr(self, name)!r} is not one of {sorted(DTYPES)}')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}')
    if self.attention_causal_blocks < 1:
      raise ValueError(
        f'model.attention_causal_blocks must be >= 1, got {self.attention_causal_blocks}'
      )
    for name in ('norm_eps', 'pc_norm_eps'):
      if not getattr(self, name) > 0:
        raise ValueError(f'model.{name} must be > 0, got {getattr(self, name)!r}')
    if not self.init_std > 0:
      raise ValueError(f'model.init_std must be > 0, got {self.init_std}')
    object.__setattr__(self, 'num_kv_heads', kv)
    object.__setattr__(self, 'head_dim', head_dim)
    object.__setattr__(self, 'rope_bases', tuple(float(b) for b in self.rope_bases))
    scaling = tuple(float(v) for v in self.rope_llama3_scaling)
    if scaling and (len(scaling) != 4 or self.rope_heads != 'single'):
      raise ValueError(
        'model.rope_llama3_scaling must be (factor, low_freq_factor, high_freq_factor, '
        f'original_max_position_embeddings) with rope_heads="single", got {scaling}'
      )
    object.__setattr__(self, 'rope_llama3_scaling', scaling)
    yarn = tuple(float(v) for v in self.rope_yarn_scaling)
    if yarn and (len(yarn) != 6 or self.rope_heads != 'single' or scaling):
      raise ValueError(
        'model.rope_yarn_scaling must be (factor, original_max_position_embeddings, beta_fast, '
        'beta_slow, attention_factor, truncate) with rope_heads="single" and no '
        f'rope_llama3_scaling, got {yarn}'
      )
    object.__setattr__(self, 'rope_yarn_scaling', yarn)
    if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
      raise ValueError(f'model.sliding_window must be an int >= 0, got {self.sliding_window!r}')
    pc.parse_stack(self.stack)
    for name, allowed in (('pc_alpha', pc.ALPHA_TYPES), ('pc_cache', pc.CACHE_MODES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'model.{name}={getattr(self, name)!r} is not one of {list(allowed)}')
    _ = self.kv_rope_bases  # validates the RoPE / HARPE fields
    if self.out_init_std is None:
      object.__setattr__(self, 'out_init_std', self.init_std / (2 * self.num_layers) ** 0.5)
    # Stored as sorted (key, value) pairs so the config stays hashable (NNX graph definitions).
    object.__setattr__(self, 'mlp_options', tuple(sorted(dict(self.mlp_options).items())))

  @classmethod
  def from_config(cls, model_config) -> TransformerConfig:
    """Builds from a ConfigDict/mapping, naming any key that is not a model field."""
    return dataclass_from_section(cls, model_config, 'model config')

  @property
  def stack_spec(self) -> pc.StackSpec:
    return pc.parse_stack(self.stack)

  @property
  def kv_rope_bases(self) -> tuple[float, ...]:
    """The RoPE base of each KV head (all `rope_base` unless HARPE)."""
    return harpe_bases(
      self.rope_heads,
      self.num_heads,
      self.num_kv_heads,
      self.rope_b_min,
      self.rope_b_max,
      self.rope_bases,
      self.rope_base,
    )

  @property
  def mlp_kwargs(self) -> dict[str, Any]:
    return dict(self.mlp_options)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

  def __init__(self, cfg: TransformerConfig, layer_index: int, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.mlp = make_mlp(cfg, layer_index, rngs)

  def __call__(self, x, positions, segment_ids, cache=None, *, commit=True):
    """-> (y, mlp aux, cache); `commit=False` attends with the cache without writing it."""
    h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, commit=commit)
    x = constrain(x + h, ('batch', 'length', 'embed'))
    h, aux = self.mlp(self.mlp_norm(x))
    return constrain(x + h, ('batch', 'length', 'embed')), aux, cache


def _layer_step(i: int):
  """Layer i of the stack as a function of (stack, block, x, history, positions, segment_ids)."""

  def step(stack, block, x, history, positions, segment_ids):
    return stack.step(i, block, x, history, positions, segment_ids)[:3]

  return step


class Transformer(nnx.Module):
  """Decoder-only LM: embed -> blocks -> final RMSNorm -> (tied) output head."""

  LINEAR_WEIGHTS = {'head': 1}  # an untied head only

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    dt, pd = cfg.compute_dtype, cfg.weight_dtype
    self.embed = Embed(
      cfg.vocab_size, cfg.d_model, std=cfg.init_std, param_dtype=pd, dtype=dt, rngs=rngs
    )
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.stack = pc.LayerStack(
      cfg.stack_spec,
      num_layers=cfg.num_layers,
      d_model=cfg.d_model,
      alpha_type=cfg.pc_alpha,
      alpha_init=cfg.pc_alpha_init,
      cache_mode=cfg.pc_cache,
      eps=cfg.pc_norm_eps,
      init_std=cfg.init_std,
      param_dtype=pd,
      rngs=rngs,
    )
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = param(
        rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), std=cfg.init_std, dtype=pd
      )

  def output_head(self) -> jax.Array:
    """The [d_model, vocab] output projection (the transposed embedding when tied), with its LoRA
    update merged in when adapted."""
    if self.config.tie_embeddings:
      return self.embed.embedding[...].T
    return adapted(self, 'head')

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    caches: Sequence[KVCache] | None = None,
    return_hidden: bool = False,
    return_layers: bool = False,
  ):
    """tokens [b, l] -> (logits [b, l, vocab] float32 (or final hidden states), extras).

    `extras` holds `mlp_aux` (one dict per layer; for multi-evaluation stacks the elementwise mean
    over the layer's block evaluations), `caches` (updated, or None) and `hidden` (the normalised
    final hidden states, for chunked log-prob kernels that apply the head themselves); with
    `return_layers`, also `layers`: the residual stream after each layer (before the final norm).
    """
    b, length = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, length), jnp.int32)
    if positions is None:
      start = 0 if caches is None else caches[0].end
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (b, length))
    x = constrain(self.embed(tokens), ('batch', 'length', 'embed'))
    policy = REMAT_POLICIES[self.config.remat]
    per_layer = self.stack.caches_per_layer
    if caches is not None and len(caches) != self.config.num_layers * per_layer:
      raise ValueError(
        f'got {len(caches)} KV caches for {self.config.num_layers} layers x {per_layer}; '
        'use model.init_caches'
      )
    history = self.stack.init_history(x)
    mlp_aux, new_caches, layer_states = [], [], []
    for i, block in enumerate(self.layers):
      if caches is None and self.config.remat != 'none':
        # The whole layer (all RK stages, predictor and corrector) is one checkpointed function.
        x, history, aux = nnx.remat(_layer_step(i), policy=policy)(
          self.stack, block, x, history, positions, segment_ids
        )
      else:
        layer_caches = None if caches is None else caches[i * per_layer : (i + 1) * per_layer]
        x, history, aux, layer_caches = self.stack.step(
          i, block, x, history, positions, segment_ids, layer_caches
        )
        new_caches.extend(layer_caches or ())
      mlp_aux.append(aux)
      layer_states.append(x)
    hidden = self.final_norm(x)
    extras = {
      'mlp_aux': mlp_aux,
      'caches': None if caches is None else new_caches,
      'hidden': hidden,
    }
    if return_layers:
      extras['layers'] = layer_states
    if return_hidden:
      return hidden, extras
    logits = dense(hidden, self.output_head().astype(hidden.dtype)).astype(jnp.float32)
    return constrain(logits, ('batch', 'length', 'vocab')), extras

  def layer_step(self, i: int, x, positions, segment_ids, cache: KVCache):
    """Layer i alone on residual states x with its KV cache -> (x, cache); vanilla stack only.

    With `layer_kv`, what early-exit decoding needs to run (or skip) the layers one at a time.
    """
    if self.config.stack_spec.kind != 'vanilla':
      raise ValueError(f'layer_step needs model.stack=vanilla, got {self.config.stack!r}')
    x, _, _, caches = self.stack.step(i, self.layers[i], x, (), positions, segment_ids, [cache])
    return x, caches[0]

  def layer_kv(self, i: int, x, positions) -> tuple[jax.Array, jax.Array]:
    """The keys/values layer i would cache for residual states x (its attention input is norm(x))."""
    block = self.layers[i]
    return block.attn.project_kv(block.attn_norm(x), positions)

  def init_caches(self, batch: int, max_len: int, dtype=None) -> list[KVCache]:
    """Empty KV caches for decoding up to `max_len` tokens: one per layer (times the block
    evaluations per layer when `model.pc_cache='per_stage'`)."""
    c = self.config
    return [
      KVCache.empty(batch, max_len, c.num_kv_heads, c.head_dim, dtype or c.compute_dtype)
      for _ in range(c.num_layers * self.stack.caches_per_layer)
    ]
