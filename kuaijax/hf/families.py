"""Hugging Face `config.json` <-> kuaijax `model` config, per model family.

Families: llama (1/2/3, incl. Llama-3 RoPE scaling), mistral, qwen2, qwen3 (dense); mixtral,
qwen2_moe, qwen3_moe (MoE). Each family names the HF fields it maps; every other field must be one
of the fields that do not change the function (ids, dropout, init range, ...), so an HF option kuaijax
does not implement (a RoPE type, a projection bias, sliding windows in Qwen, quantisation) is an
error naming the field, never silently ignored.

MoE semantics (HF reference implementations): router softmax over all experts in float32, top-k,
weights renormalised over the k kept experts when `norm_topk_prob` (always for Mixtral), experts
SwiGLU; Qwen2-MoE adds a shared SwiGLU expert scaled by sigmoid(x . g).
"""

from __future__ import annotations

import math
from typing import Any

DENSE = ('llama', 'mistral', 'qwen2', 'qwen3')
MOE = ('mixtral', 'qwen2_moe', 'qwen3_moe')
FAMILIES = DENSE + MOE
ARCHITECTURES = {
  'llama': 'LlamaForCausalLM',
  'mistral': 'MistralForCausalLM',
  'qwen2': 'Qwen2ForCausalLM',
  'qwen3': 'Qwen3ForCausalLM',
  'mixtral': 'MixtralForCausalLM',
  'qwen2_moe': 'Qwen2MoeForCausalLM',
  'qwen3_moe': 'Qwen3MoeForCausalLM',
}
# Fields that never change the forward function of an inference model.
HARMLESS = {
  'architectures',
  'model_type',
  'transformers_version',
  'torch_dtype',
  'dtype',
  'bos_token_id',
  'eos_token_id',
  'pad_token_id',
  'use_cache',
  'initializer_range',
  'attention_dropout',
  'max_position_embeddings',
  'pretraining_tp',  # a tensor-parallel split of the same matmuls
  'output_router_logits',
  'router_aux_loss_coef',
  'router_jitter_noise',  # training-time input noise of the router
  'output_attentions',
  'output_hidden_states',
  'return_dict',
  'tie_word_embeddings',
  'max_window_layers',  # only read when use_sliding_window
  'layer_types',  # checked: every layer 'full_attention' (or Mistral's sliding window)
  'use_sliding_window',  # checked
  'sliding_window',  # checked
}
# Per family: fields with default values as transformers defines them.
DEFAULTS = {
  'llama': dict(rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, mlp_bias=False),
  'mistral': dict(rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096),
  'qwen2': dict(rms_norm_eps=1e-6, rope_theta=10000.0, use_sliding_window=False),
  'qwen3': dict(
    rms_norm_eps=1e-6, rope_theta=10000.0, use_sliding_window=False, attention_bias=False
  ),
  'mixtral': dict(
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    num_experts_per_tok=2,
    num_local_experts=8,
    sliding_window=None,
  ),
  'qwen2_moe': dict(
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    use_sliding_window=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=False,
    qkv_bias=True,
  ),
  'qwen3_moe': dict(
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    use_sliding_window=False,
    attention_bias=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=False,
  ),
}
COMMON = (
  'vocab_size',
  'hidden_size',
  'intermediate_size',
  'num_hidden_layers',
  'num_attention_heads',
  'num_key_value_heads',
  'head_dim',
  'hidden_act',
  'rms_norm_eps',
  'rope_theta',
  'rope_scaling',
  'rope_parameters',
)
MOE_FIELDS = (
  'num_experts_per_tok',
  'num_local_experts',
  'num_experts',
  'moe_intermediate_size',
  'shared_expert_intermediate_size',
  'norm_topk_prob',
  'decoder_sparse_step',
  'mlp_only_layers',
)


class UnsupportedConfig(ValueError):
  """An HF config field whose value kuaijax does not implement."""


def _rope(hf: dict, where: str) -> dict:
  """RoPE fields from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`."""
  params = dict(hf.get('rope_parameters') or {})
  name = 'rope_parameters'
  if not params:
    params = dict(hf.get('rope_scaling') or {})
    name = 'rope_scaling'
  theta = params.pop('rope_theta', hf.get('rope_theta', DEFAULTS[hf['model_type']]['rope_theta']))
  kind = params.pop('rope_type', params.pop('type', 'default'))
  partial = params.pop('partial_rotary_factor', 1.0)
  if partial != 1.0:
    raise UnsupportedConfig(f'{where}: {name}.partial_rotary_factor={partial} is not supported')
  out: dict[str, Any] = {'rope_base': float(theta)}
  if kind == 'llama3':
    keys = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')
    missing = [k for k in keys if k not in params]
    if missing:
      raise UnsupportedConfig(f'{where}: {name} of type llama3 lacks {missing}')
    out['rope_llama3_scaling'] = tuple(float(params.pop(k)) for k in keys)
  elif kind == 'yarn':
    out['rope_yarn_scaling'] = _yarn(params, hf, where, name)
  elif kind != 'default':
    raise UnsupportedConfig(
      f'{where}: {name}.rope_type={kind!r} is not supported (only default, llama3 and yarn)'
    )
  if params:
    raise UnsupportedConfig(f'{where}: {name} fields {sorted(params)} are not supported')
  return out


def _yarn(params: dict, hf: dict, where: str, name: str) -> tuple[float, ...]:
  """`model.rope_yarn_scaling` from a yarn rope dict (consumed), with transformers' defaults:
  beta_fast 32, beta_slow 1, truncate true, factor = max_position_embeddings / original, and the
  attention factor from mscale / mscale_all_dim or 0.1 ln(factor) + 1."""
  if 'original_max_position_embeddings' not in params:
    raise UnsupportedConfig(f'{where}: {name} of type yarn lacks original_max_position_embeddings')
  old_len = float(params.pop('original_max_position_embeddings'))
  factor = params.pop('factor', None)
  if factor is None:
    if 'max_position_embeddings' not in hf:
      raise UnsupportedConfig(f'{where}: {name} of type yarn has no factor')
    factor = hf['max_position_embeddings'] / old_len
  factor = float(factor)
  mscale, mscale_all_dim = params.pop('mscale', None), params.pop('mscale_all_dim', None)

  def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention = params.pop('attention_factor', None)
  if attention is None:
    if mscale and mscale_all_dim:
      attention = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    else:
      attention = get_mscale(factor)
  beta_fast = float(params.pop('beta_fast', None) or 32)
  beta_slow = float(params.pop('beta_slow', None) or 1)
  truncate = float(bool(params.pop('truncate', True)))
  return (factor, old_len, beta_fast, beta_slow, float(attention), truncate)


def _sparse_layout(hf: dict, num_layers: int, where: str) -> dict:
  """Qwen-MoE's sparse layers (decoder_sparse_step, mlp_only_layers) as first_dense_layers /
  expert_frequency, when they can be written that way."""
  step = int(hf.get('decoder_sparse_step', 1))
  only = {int(i) for i in hf.get('mlp_only_layers') or ()}
  sparse = {i for i in range(num_layers) if i not in only and (i + 1) % step == 0}
  for first in range(num_layers + 1):
    for freq in range(1, num_layers + 1):
      if {i for i in range(first, num_layers) if (i - first) % freq == 0} == sparse:
        return {'first_dense_layers': first, 'expert_frequency': freq}
  raise UnsupportedConfig(
    f'{where}: mlp_only_layers={sorted(only)} with decoder_sparse_step={step} is not a '
    'first-dense-layers + every-n-th-layer pattern'
  )


def model_config(hf: dict, *, where: str = 'config.json', dtype: str = 'float32') -> dict:
  """HF config dict -> kuaijax `model` config dict (TransformerConfig fields)."""
  family = hf.get('model_type')
  if family not in FAMILIES:
    raise UnsupportedConfig(f'{where}: model_type={family!r} is not one of {list(FAMILIES)}')
  defaults = DEFAULTS[family]
  known = HARMLESS | set(COMMON) | set(defaults) | (set(MOE_FIELDS) if family in MOE else set())
  unknown = sorted(k for k in hf if k not in known and not k.startswith('_'))
  if unknown:
    raise UnsupportedConfig(f'{where}: fields {unknown} are not supported for {family}')
  get = lambda k: hf[k] if hf.get(k) is not None else defaults.get(k)  # noqa: E731
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise UnsupportedConfig(f'{where}: hidden_act={act!r} is not supported (only silu)')
  for name in ('attention_bias', 'mlp_bias'):
    if get(name):
      raise UnsupportedConfig(f'{where}: {name}=True is not supported for {family}')
  window = 0
  if family in ('mistral', 'mixtral'):
    window = int(get('sliding_window') or 0)
  elif get('use_sliding_window'):
    raise UnsupportedConfig(f'{where}: use_sliding_window=True is not supported for {family}')
  layer_types = set(hf.get('layer_types') or ())
  if layer_types - {'full_attention', 'sliding_attention' if window else 'full_attention'}:
    raise UnsupportedConfig(f'{where}: layer_types={sorted(layer_types)} is not supported')
  heads = int(hf['num_attention_heads'])
  out: dict[str, Any] = dict(
    vocab_size=int(hf['vocab_size']),
    d_model=int(hf['hidden_size']),
    num_layers=int(hf['num_hidden_layers']),
    num_heads=heads,
    num_kv_heads=int(hf.get('num_key_value_heads') or heads),
    head_dim=int(hf.get('head_dim') or int(hf['hidden_size']) // heads),
    d_ff=int(hf['intermediate_size']),
    tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
    norm_eps=float(get('rms_norm_eps')),
    qkv_bias=family == 'qwen2' or (family == 'qwen2_moe' and bool(get('qkv_bias'))),
    qk_norm=family in ('qwen3', 'qwen3_moe'),
    sliding_window=window,
    dtype=dtype,
    param_dtype=dtype,
    **_rope(hf, where),
  )
  if family in MOE:
    experts = (
      hf.get('num_local_experts') or hf.get('num_experts') or defaults.get('num_local_experts')
    )
    options = dict(
      num_experts=int(experts),
      routing='top_k',
      k=int(get('num_experts_per_tok')),
      renormalize=True if family == 'mixtral' else bool(get('norm_topk_prob')),
      expert_d_ff=int(hf.get('moe_intermediate_size') or hf['intermediate_size']),
    )
    if family != 'mixtral':
      options.update(_sparse_layout(hf, out['num_layers'], where))
    if family == 'qwen2_moe':
      options['shared_d_ff'] = int(hf['shared_expert_intermediate_size'])
    out['mlp'] = 'moe_gated_shared' if family == 'qwen2_moe' else 'moe'
    out['mlp_options'] = options
  return out


def infer_family(model: dict) -> str:
  """The HF family a kuaijax model config exports to."""
  mlp = model.get('mlp', 'swiglu')
  if mlp == 'moe_gated_shared':
    return 'qwen2_moe'
  if mlp == 'moe':
    return 'qwen3_moe' if model.get('qk_norm') else 'mixtral'
  if model.get('qk_norm'):
    return 'qwen3'
  if model.get('qkv_bias'):
    return 'qwen2'
  return 'mistral' if model.get('sliding_window') else 'llama'


def hf_config(model: dict, family: str | None = None, *, dtype: str = 'float32') -> dict:
  """kuaijax `model` config dict (TransformerConfig fields) -> HF config dict of `family`."""
  family = family or infer_family(model)
  if family not in FAMILIES:
    raise UnsupportedConfig(f'family={family!r} is not one of {list(FAMILIES)}')
  if model.get('stack', 'vanilla') != 'vanilla' or model.get('rope_heads', 'single') != 'single':
    raise UnsupportedConfig('only vanilla stacks with single-base RoPE export to HF')
  if bool(model.get('qkv_bias')) != (family == 'qwen2') and family != 'qwen2_moe':
    raise UnsupportedConfig(f'qkv_bias={model.get("qkv_bias")} does not fit {family}')
  if bool(model.get('qk_norm')) != (family in ('qwen3', 'qwen3_moe')):
    raise UnsupportedConfig(f'qk_norm={model.get("qk_norm")} does not fit {family}')
  if model.get('sliding_window') and family not in ('mistral', 'mixtral'):
    raise UnsupportedConfig(f'sliding_window does not fit {family}')
  heads = model['num_heads']
  rope = {'rope_theta': float(model.get('rope_base', 10000.0)), 'rope_type': 'default'}
  yarn = tuple(model.get('rope_yarn_scaling') or ())
  if yarn:
    rope.update(
      rope_type='yarn',
      factor=yarn[0],
      original_max_position_embeddings=int(yarn[1]),
      beta_fast=yarn[2],
      beta_slow=yarn[3],
      attention_factor=yarn[4],
      truncate=bool(yarn[5]),
    )
  scaling = tuple(model.get('rope_llama3_scaling') or ())
  if scaling:
    rope.update(
      rope_type='llama3',
      factor=scaling[0],
      low_freq_factor=scaling[1],
      high_freq_factor=scaling[2],
      original_max_position_embeddings=int(scaling[3]),
    )
  hf: dict[str, Any] = dict(
    architectures=[ARCHITECTURES[family]],
    model_type=family,
    vocab_size=model['vocab_size'],
    hidden_size=model['d_model'],
    intermediate_size=model['d_ff'],
    num_hidden_layers=model['num_layers'],
    num_attention_heads=heads,
    num_key_value_heads=model.get('num_kv_heads') or heads,
    head_dim=model.get('head_dim') or model['d_model'] // heads,
    hidden_act='silu',
    rms_norm_eps=float(model.get('norm_eps', 1e-6)),
    tie_word_embeddings=bool(model.get('tie_embeddings', True)),
    rope_theta=rope['rope_theta'],
    rope_parameters=rope,
    rope_scaling=rope if scaling or yarn else None,  # the transformers < 5 spelling
    torch_dtype=dtype,
  )
  if family in ('mistral', 'mixtral'):
    hf['sliding_window'] = int(model.get('sliding_window') or 0) or None
  if family in MOE:
    if model.get('mlp') not in ('moe', 'moe_gated_shared'):
      raise UnsupportedConfig(f'a {model.get("mlp")!r} feed-forward does not fit {family}')
    opts = dict(model.get('mlp_options') or {})
    if opts.get('routing') != 'top_k' or opts.get('num_shared_experts'):
      raise UnsupportedConfig(
        f'{family} exports need routing="top_k" without num_shared_experts, got {opts}'
      )
    if family == 'mixtral' and not opts.get('renormalize'):
      raise UnsupportedConfig('mixtral renormalises the top-k weights: needs renormalize=True')
    hf['num_experts_per_tok'] = opts['k']
    if family == 'mixtral':
      hf['num_local_experts'] = opts['num_experts']
      if opts.get('expert_d_ff', model['d_ff']) != model['d_ff']:
        raise UnsupportedConfig('mixtral experts have width intermediate_size (= d_ff)')
    else:
      first, freq = opts.get('first_dense_layers', 0), opts.get('expert_frequency', 1)
      if freq == 1:
        step, only = 1, list(range(first))
      elif (first + 1) % freq == 0:
        step, only = freq, [i for i in range(first) if (i + 1) % freq == 0]
      else:
        raise UnsupportedConfig(
          f'first_dense_layers={first} with expert_frequency={freq} has no HF equivalent'
        )
      hf.update(
        num_experts=opts['num_experts'],
        moe_intermediate_size=opts.get('expert_d_ff') or model['d_ff'],
        norm_topk_prob=bool(opts.get('renormalize')),
        decoder_sparse_step=step,
        mlp_only_layers=only,
      )
      if family == 'qwen2_moe':
        hf['shared_expert_intermediate_size'] = opts['shared_d_ff']
        hf['qkv_bias'] = bool(model.get('qkv_bias'))
  return hf
