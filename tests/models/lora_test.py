"""LoRA adapters: a fresh adapter is the base exactly, merging equals the adapted model (dense,
MoE experts, shared experts, head, bfloat16 base), adapters switched off are the base, the expert
pairs and rsLoRA scale, dropout, and clear errors for bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax.models import lora
from kuaijax.models.transformer import Transformer, TransformerConfig

TOKENS = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 50
ALL = (*lora.DEFAULT_TARGETS, 'head')


def model_config(**overrides):
  fields = dict(
    vocab_size=50,
    d_model=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    d_ff=32,
    qkv_bias=True,
    tie_embeddings=False,
  )
  return TransformerConfig(**{**fields, **overrides})


MOE = dict(
  mlp='moe',
  mlp_options={'num_experts': 4, 'routing': 'top_k', 'k': 2, 'num_shared_experts': 1},
)


def adapted(cfg, targets=ALL, **lora_options):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  base = model(TOKENS)[0]
  lora.apply(model, lora.LoRAConfig(rank=3, targets=targets, **lora_options), rngs=nnx.Rngs(1))
  return model, base


def randomise(model, seed=2):
  """Non-zero B factors (a trained adapter)."""
  for i, adapter in enumerate(lora.adapters(model).values()):
    key = jax.random.fold_in(jax.random.key(seed), i)
    adapter.b[...] = 0.2 * jax.random.normal(key, adapter.b.shape)


def logits(model):
  return np.asarray(model(TOKENS)[0])


@pytest.mark.parametrize('overrides', [{}, MOE], ids=['dense', 'moe'])
def test_fresh_adapters_are_the_base_and_merge_equals_the_adapted_model(overrides):
  model, base = adapted(model_config(**overrides))
  np.testing.assert_array_equal(logits(model), base)  # B = 0
  randomise(model)
  adapted_logits = logits(model)
  assert np.abs(adapted_logits - base).max() > 0.1
  np.testing.assert_array_equal(logits(lora.without_adapters(model)), base)
  np.testing.assert_array_equal(logits(model), adapted_logits)  # the view left it untouched
  graphdef, params = nnx.split(model, nnx.Param)
  merged = lora.merged_params(graphdef, nnx.to_pure_dict(params))
  plain = nnx.graphdef(Transformer(model.config, rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(logits(nnx.merge(plain, merged)), adapted_logits, atol=2e-5)


def test_adapted_paths_expert_pairs_and_scales():
  model, _ = adapted(model_config(**MOE), rslora=True)
  paths = list(lora.adapters(model))
  assert paths[:8] == [
    'layers.0.attn.wq',
    'layers.0.attn.wk',
    'layers.0.attn.wv',
    'layers.0.attn.wo',
    'layers.0.mlp.w1',
    'layers.0.mlp.w3',
    'layers.0.mlp.w2',
    'layers.0.mlp.shared_w1',
  ]
  assert paths[-1] == 'head'
  wo, w1 = lora.adapters(model)['layers.0.attn.wo'], lora.adapters(model)['layers.0.mlp.w1']
  assert wo.a.shape == (4, 4, 3) and wo.b.shape == (3, 16)  # [H, hd, r], [r, d]
  assert w1.a.shape == (4, 16, 3) and w1.b.shape == (4, 3, 32)  # one pair per expert
  assert w1.scale == pytest.approx(16 / np.sqrt(3))  # rsLoRA: alpha / sqrt(r)
  randomise(model)
  delta = np.asarray(w1.delta())
  for e in range(4):
    np.testing.assert_allclose(delta[e], w1.scale * w1.a[e] @ w1.b[e], atol=1e-5)
  assert lora.LoRAConfig(rank=4, alpha=8).scale == 2.0


def test_targets_by_path_pattern_and_bfloat16_base():
  cfg = model_config(param_dtype='bfloat16')
  model, base = adapted(cfg, targets=(r'layers\.1\.attn\.w[qv]',))
  assert list(lora.adapters(model)) == ['layers.1.attn.wq', 'layers.1.attn.wv']
  adapter = lora.adapters(model)['layers.1.attn.wq']
  assert adapter.a.dtype == jnp.float32 and model.layers[1].attn.wq.dtype == jnp.bfloat16
  randomise(model)
  merged = lora.merge(model)
  assert not lora.adapters(merged) and merged.layers[1].attn.wq.dtype == jnp.bfloat16


def test_dropout_only_in_seeded_training_steps():
  model, base = adapted(model_config(), targets=('wq',), dropout=0.5)
  randomise(model)
  clean = logits(model)
  lora.seed_dropout(model, jax.random.key(0))
  dropped = logits(model)
  assert np.abs(dropped - clean).max() > 1e-3
  fresh, _ = adapted(model_config(), targets=('wq',), dropout=0.5)
  randomise(fresh)
  np.testing.assert_array_equal(logits(fresh), clean)  # no key: evaluation, no dropout


@pytest.mark.parametrize(
  'options, message',
  [
    ({'rank': 0}, r'lora.rank=0 must be a positive int'),
    ({'alpha': 0}, r'lora.alpha=0 must be a number > 0'),
    ({'dropout': 1.0}, r'lora.dropout=1.0 must be in \[0, 1\)'),
    ({'targets': ()}, 'lora.targets is empty'),
    ({'targets': ('q_proj(',)}, 'not a regular expression'),
  ],
)
def test_bad_configs_are_refused(options, message):
  with pytest.raises(ValueError, match=message):
    lora.LoRAConfig(**options)


def test_targets_that_match_nothing_are_named():
  with pytest.raises(ValueError, match=r"\['q_proj', 'head'\] match no linear weight.*'wq'"):
    adapted(model_config(tie_embeddings=True), targets=('wq', 'q_proj', 'head'))  # no head
  with pytest.raises(ValueError, match=r"unknown lora keys \['r'\]"):
    lora.LoRAConfig.from_config({'r': 4})


def test_split_and_join_params():
  model, _ = adapted(model_config(), targets=('wq',))
  params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
  adapters, base = lora.split_params(params)
  assert set(adapters['layers'][0]['attn']) == {'wq_lora'}
  assert 'wq_lora' not in base['layers'][0]['attn'] and 'wq' in base['layers'][0]['attn']
  joined = lora.join_params(adapters, base)
  assert jax.tree.structure(joined) == jax.tree.structure(params)
  assert lora.trainable_split(base) == (base, {})
