"""YaRN RoPE frequencies and attention factor against transformers' own computation."""

import numpy as np
import pytest

pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from kuaijax.hf import families  # noqa: E402
from kuaijax.models.attention import yarn_inv_freq  # noqa: E402


@pytest.mark.parametrize(
  'rope',
  [
    dict(factor=4.0, original_max_position_embeddings=8),
    dict(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0),
    dict(
      factor=8.0, original_max_position_embeddings=64, beta_fast=16, beta_slow=2, truncate=False
    ),
    dict(factor=2.0, original_max_position_embeddings=32, attention_factor=0.9),
  ],
)
def test_yarn_matches_transformers(rope):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf = dict(model_type='qwen2', max_position_embeddings=131072, rope_theta=10000.0)
  config = transformers.AutoConfig.for_model(
    'qwen2',
    hidden_size=64,
    num_attention_heads=2,
    max_position_embeddings=131072,
    rope_scaling=dict(rope_type='yarn', **rope),
  )
  ref_freq, ref_factor = ROPE_INIT_FUNCTIONS['yarn'](config)
  scaling = families._rope({**hf, 'rope_scaling': dict(rope_type='yarn', **rope)}, 'config.json')
  yarn = scaling['rope_yarn_scaling']
  half = 16  # head_dim 32
  plain = 10000.0 ** (-np.arange(half, dtype=np.float32) / half)
  ours = np.asarray(yarn_inv_freq(plain[None, :], 10000.0, yarn))[0]
  np.testing.assert_allclose(ours, ref_freq.numpy(), rtol=2e-6)
  assert yarn[4] == pytest.approx(ref_factor, rel=1e-12)
