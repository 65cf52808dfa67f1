"""HARPE per-head RoPE bases: strategies, GQA sharing, per-head rotation, decoding, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax.models import attention
from kuaijax.models.transformer import Transformer, TransformerConfig, harpe_bases

PAPER_BASES = tuple(
  1e6 * b
  for b in (
    1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47, 2.50, 2.65, 2.68, 2.71, 2.74, 2.80, 2.83, 2.92,
    3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46, 3.61, 3.88, 4.09, 4.15, 4.39, 4.45, 4.51, 4.54,
  )
)  # fmt: skip


def config(**overrides):
  values = dict(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=24)
  values.update(overrides)
  return TransformerConfig(**values)


def test_uniform_strategies_and_lists():
  # b_h = b_min + h (b_max - b_min) / (N - 1) over the N KV heads.
  assert harpe_bases('ascending', 4, 4, 1e4, 4e4) == (1e4, 2e4, 3e4, 4e4)
  assert harpe_bases('descending', 4, 4, 1e4, 4e4) == (4e4, 3e4, 2e4, 1e4)
  assert harpe_bases('ascending', 8, 2, 1e4, 4e4) == (1e4, 4e4)  # one base per KV head
  assert harpe_bases('single', 8, 2, base=500.0) == (500.0, 500.0)
  assert harpe_bases('list', 32, 32, bases=PAPER_BASES) == PAPER_BASES
  # A per-query-head list is accepted under GQA when each group carries one value.
  assert harpe_bases('list', 4, 2, bases=(10.0, 10.0, 20.0, 20.0)) == (10.0, 20.0)
  assert config(rope_heads='list', rope_bases=(7e3, 9e3)).kv_rope_bases == (7e3, 9e3)


def test_query_heads_share_their_kv_heads_base():
  cfg = config(d_model=48, num_heads=6, rope_heads='ascending', rope_b_min=1e3, rope_b_max=3e3)
  attn = Transformer(cfg, rngs=nnx.Rngs(0)).layers[0].attn
  assert attn.k_bases == (1e3, 3e3)
  assert attn.q_bases == (1e3, 1e3, 1e3, 3e3, 3e3, 3e3)  # jax GQA: query head h -> KV head h // 3


def test_per_head_rope_equals_single_base_rope_per_head():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  pos = jnp.broadcast_to(jnp.arange(5) * 7, (2, 5))
  bases = (100.0, 1e4, 5e5)
  got = attention.rope(x, pos, bases)
  for h, b in enumerate(bases):
    np.testing.assert_allclose(got[:, :, h], attention.rope(x[:, :, h : h + 1], pos, b)[:, :, 0])
  # Each head's scores stay relative: q_m . k_n depends on m - n only.
  q, k = x[:1, :1], x[1:, :1]

  def score(m, n):
    return jnp.sum(
      attention.rope(q, jnp.array([[m]]), bases) * attention.rope(k, jnp.array([[n]]), bases), -1
    )

  np.testing.assert_allclose(score(9, 4), score(25, 20), rtol=1e-4, atol=1e-5)


def test_harpe_model_decodes_like_its_full_forward_and_differs_from_single_base():
  cfg = config(rope_heads='descending', rope_b_min=50.0, rope_b_max=5e4)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  single = Transformer(config(), rngs=nnx.Rngs(0))
  seq = jax.random.randint(jax.random.key(1), (2, 9), 0, 37)
  full, _ = model(seq)
  out, extras = model(seq[:, :5], caches=model.init_caches(2, 12))
  outs = [out]
  for t in range(5, 9):
    out, extras = model(seq[:, t : t + 1], caches=extras['caches'])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  assert float(jnp.abs(full - single(seq)[0]).max()) > 1e-4


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(rope_heads='spiral'), "model.rope_heads='spiral' is not one of"),
    (dict(rope_heads='list', rope_bases=(1e4, 2e4, 3e4)), 'rope_bases has 3 entries; expected'),
    (dict(rope_heads='list', rope_bases=()), 'rope_bases has 0 entries'),
    (
      dict(rope_heads='list', rope_bases=(1e4, 2e4, 3e4, 4e4)),
      'query heads sharing a KV head must share its base',
    ),
    (dict(rope_heads='ascending'), 'needs 1 < model.rope_b_min < model.rope_b_max'),
    (dict(rope_heads='ascending', rope_b_min=5e4, rope_b_max=1e4), 'needs 1 < model.rope_b_min'),
    (dict(rope_heads='list', rope_bases=(1e4, 0.5)), 'RoPE bases must be > 1'),
  ],
)
def test_bad_harpe_configs_are_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    config(**overrides)
