"""ODE / PCformer stacks: update rules vs hand-computed values, W/Wc init and masking, weight reuse,
gradients to alpha/W/Wc/gates, KV-cache semantics (exact per-stage decoding, corrector-only writes),
remat, feed-forward aux per layer and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax.models import pc
from kuaijax.models.layers import MLP_REGISTRY, SwiGLU, register_mlp
from kuaijax.models.transformer import Transformer, TransformerConfig

STACKS = ('vanilla', 'ode_rk2', 'ode_rk2_gated', 'ode_rk4', 'pc_rk2', 'pc_rk4')


def small_config(**overrides):
  values = dict(vocab_size=37, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=24)
  values.update(overrides)
  return TransformerConfig(**values)


def tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, 37)


class Recorder:
  """The block function g(x) = 2x that records the evaluation indices it is called with."""

  def __init__(self):
    self.calls = []

  def __call__(self, j, x):
    self.calls.append(j)
    return 2.0 * x


x1 = jnp.array([1.0])


def test_ode_rules_match_hand_computed_values():
  # g(x) = 2x, x = 1: RK2 F1 = 2, F2 = g(1 + 2) = 6 -> 1 + (2 + 6)/2 = 5.
  g = Recorder()
  np.testing.assert_allclose(pc.ode_step(g, x1, 2), [5.0])
  assert g.calls == [0, 1]
  # RK4: F1 = 2, F2 = g(1 + 1) = 4, F3 = g(1 + 2) = 6, F4 = g(1 + 6) = 14 -> 1 + 36/6 = 7.
  g = Recorder()
  np.testing.assert_allclose(pc.ode_step(g, x1, 4), [7.0])
  assert g.calls == [0, 1, 2, 3]
  # Gated RK2 with w = [0.5, -0.25], b = 0: logit = 1 - 1.5, g = sigmoid(-0.5), y = 1 + 2g + 6(1-g).
  gate = 1 / (1 + np.exp(0.5))
  out = pc.ode_step(Recorder(), x1, 2, (jnp.array([0.5, -0.25]), jnp.array(0.0)))
  np.testing.assert_allclose(out, [1 + 2 * gate + 6 * (1 - gate)], rtol=1e-6)


def test_pc_predictor_matches_hand_computed_values():
  ident = [lambda f: f] * 4
  # RK2, alpha 0.3: F1 = 2, F2 = 6 -> 1 + 0.3 * 0.7 * 2 + 0.3 * 6 = 3.22.
  np.testing.assert_allclose(pc.pc_predict(Recorder(), x1, 0.3, 2, ident), [3.22], rtol=1e-6)
  # RK4, alpha 0.5: F = 2, 4, 6, 14 with weights 1/16, 1/8, 1/4, 1/2 -> 10.125.
  np.testing.assert_allclose(pc.pc_predict(Recorder(), x1, 0.5, 4, ident), [10.125], rtol=1e-6)
  # Stage norms act on each stage before it feeds the next: F1 = 2/2 = 1, F2 = g(1 + 1)/4 = 1.
  halves = [lambda f: f / 2, lambda f: f / 4]
  np.testing.assert_allclose(pc.pc_predict(Recorder(), x1, 0.3, 2, halves), [1.51], rtol=1e-6)
  # Per-channel alpha broadcasts over the channels.
  x2 = jnp.array([1.0, 1.0])
  out = pc.pc_predict(Recorder(), x2, jnp.array([0.3, 0.5]), 2, ident)
  np.testing.assert_allclose(out, [3.22, 1 + 0.25 * 2 + 0.5 * 6], rtol=1e-6)


def test_pc_corrector_matches_hand_computed_values():
  w = wc = jnp.asarray(pc.init_multistep(2))
  g = Recorder()
  # Layer 1, H = [1], P = 3.22, LNp = /2, LNc = -1: H = [1, 1.61], z = 1.305, y = 2.61,
  # H[1] = 1.61, x_1 = (1 + 1.61) / 2.
  x, history = pc.pc_correct(
    g, jnp.array([3.22]), (x1,), 1, w, wc, lambda v: v / 2, lambda v: v - 1, order=2
  )
  np.testing.assert_allclose(x, [1.305], rtol=1e-6)
  np.testing.assert_allclose(jnp.concatenate(history), [1.0, 1.61], rtol=1e-6)
  assert g.calls == [2]  # the corrector is evaluation `order` of the layer
  # Whole RK2 layer with identity norms and a non-uniform Wc row: P = 3.22, z = 2.11, y = 4.22.
  wc2 = wc.at[1, :2].set(jnp.array([0.25, 0.75]))
  ident = lambda v: v
  g = Recorder()
  x, _ = pc.pc_layer(
    g,
    x1,
    (x1,),
    1,
    alpha=0.3,
    w=w,
    wc=wc2,
    order=2,
    stage_norms=[ident] * 2,
    norm_p=ident,
    norm_c=ident,
  )
  np.testing.assert_allclose(x, [0.25 + 0.75 * 4.22], rtol=1e-6)
  assert g.calls == [0, 1, 2]  # RK2 PC: 3 block evaluations


def test_multistep_init_and_masking():
  w = pc.init_multistep(3)
  expected = np.array(
    [[1, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0], [1 / 4, 1 / 4, 1 / 4, 1 / 4]]
  )
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  packed = pc.pack_tril(w)
  assert packed.shape == (10,)
  np.testing.assert_array_equal(pc.unpack_tril(packed + 5.0, 4)[np.triu_indices(4, 1)], 0.0)
  model = Transformer(small_config(stack='pc_rk2', num_layers=3), rngs=nnx.Rngs(0))
  mw, mwc = model.stack.matrices()
  np.testing.assert_allclose(mw, expected, rtol=1e-6)
  np.testing.assert_allclose(mwc, expected, rtol=1e-6)


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('stack', STACKS[1:])
def test_stages_reuse_one_layers_weights(stack):
  cfg = small_config(stack=stack)
  base = _params(Transformer(small_config(), rngs=nnx.Rngs(0)))
  params = _params(Transformer(cfg, rngs=nnx.Rngs(0)))
  # Identical block parameters; the only extra parameters are the stack's (gate / alpha, norms, W).
  jax.tree.map(np.testing.assert_array_equal, params['layers'], base['layers'])
  d, layers, spec = cfg.d_model, cfg.num_layers, pc.parse_stack(stack)
  extra = {
    'ode': (2 * d + 1) * layers if spec.gated else 0,
    'pc': 1 + 2 * d * (spec.order + 2 * layers) + 2 * (layers + 1) * (layers + 2) // 2,
  }[spec.kind]
  assert _count(params) - _count(base) == extra
  # Every evaluation of layer i calls layer i's block.
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  called = []

  def block(x, *args, **kwargs):
    called.append(id(model.layers[1]))
    return model.layers[1](x, *args, **kwargs)

  x = jnp.ones((1, 3, d))
  pos, seg = jnp.arange(3)[None], jnp.ones((1, 3), jnp.int32)
  history = model.stack.init_history(x) + (x,)
  model.stack.step(1, block, x, history, pos, seg)
  assert called == [id(model.layers[1])] * spec.evaluations


@pytest.mark.parametrize('alpha_type', ['scalar', 'per_channel'])
def test_gradients_reach_alpha_w_and_wc(alpha_type):
  model = Transformer(small_config(stack='pc_rk2', pc_alpha=alpha_type), rngs=nnx.Rngs(0))
  seq = tokens((2, 6))
  grads = nnx.grad(lambda m: jax.nn.log_softmax(m(seq)[0])[..., 3].mean())(model)
  g = nnx.to_pure_dict(grads)['stack']
  alpha_grads = [g['alpha']] if alpha_type == 'scalar' else list(g['alpha'].values())
  shapes = {'scalar': (), 'per_layer': (), 'per_channel': (16,)}[alpha_type]
  for a in alpha_grads:
    assert a.shape == shapes and float(jnp.abs(a).max()) > 0
  rows, cols = np.tril_indices(3)
  used = rows > 0  # row 0 is never read (x_0 = h_0); every entry k <= i of rows 1..L is
  for name in ('w', 'wc'):
    square = np.asarray(pc.unpack_tril(g[name], 3))
    assert np.abs(square[rows[used], cols[used]]).min() > 0, name
    assert np.abs(square[0]).max() == 0 and np.abs(square[np.triu_indices(3, 1)]).max() == 0


def test_gradients_reach_the_rk2_gate():
  model = Transformer(small_config(stack='ode_rk2_gated'), rngs=nnx.Rngs(0))
  seq = tokens((2, 6))
  grads = nnx.to_pure_dict(nnx.grad(lambda m: m(seq)[0][..., 3].mean())(model))
  for gate in grads['stack']['gates'].values():
    assert float(jnp.abs(gate['w']).max()) > 0 and float(jnp.abs(gate['b'])) > 0


def _decode(model, seq, prefill, caches):
  out, extras = model(seq[:, :prefill], caches=caches)
  outs, caches = [out], extras['caches']
  for t in range(prefill, seq.shape[1]):
    out, extras = model(seq[:, t : t + 1], caches=caches)
    outs.append(out)
    caches = extras['caches']
  return jnp.concatenate(outs, axis=1), caches


@pytest.mark.parametrize('stack', STACKS)
def test_per_stage_cache_decoding_equals_full_forward(stack):
  model = Transformer(small_config(stack=stack, pc_cache='per_stage'), rngs=nnx.Rngs(1))
  seq = tokens((2, 7), seed=2)
  full, _ = model(seq)
  caches = model.init_caches(2, 8)
  assert len(caches) == 2 * pc.parse_stack(stack).evaluations
  got, caches = _decode(model, seq, 4, caches)
  np.testing.assert_allclose(got, full, atol=2e-5)
  assert int(caches[0].end) == 7


@pytest.mark.parametrize('stack', ['ode_rk2_gated', 'pc_rk4'])
def test_corrector_cache_semantics(stack):
  n = pc.parse_stack(stack).evaluations
  model = Transformer(small_config(stack=stack), rngs=nnx.Rngs(1))
  per_stage = Transformer(small_config(stack=stack, pc_cache='per_stage'), rngs=nnx.Rngs(1))
  seq = tokens((2, 7), seed=3)
  full, _ = model(seq)
  caches = model.init_caches(2, 8)
  assert len(caches) == 2  # one cache per layer: the size of a vanilla model's
  prefill, extras = model(seq[:, :5], caches=caches)
  np.testing.assert_allclose(prefill, full[:, :5], atol=2e-5)  # a prefill is the full forward
  ref_prefill, ref_extras = per_stage(seq[:, :5], caches=per_stage.init_caches(2, 8))
  # Only the last evaluation (the corrector) wrote: the cache is per_stage's last-stage cache.
  for layer in range(2):
    want = ref_extras['caches'][layer * n + n - 1]
    jax.tree.map(np.testing.assert_array_equal, extras['caches'][layer], want)
  # One decoding step: predictor stages read the corrector's past plus their own current K/V.
  # Reference: per-stage caches that all hold the corrector's past, so each stage sees the same.
  step, extras = model(seq[:, 5:6], caches=extras['caches'])
  same_past = [c for c in ref_extras['caches'][n - 1 :: n] for _ in range(n)]
  ref_step, ref_extras = per_stage(seq[:, 5:6], caches=same_past)
  np.testing.assert_allclose(step, ref_step, atol=2e-5)
  for layer in range(2):
    want = ref_extras['caches'][layer * n + n - 1]
    jax.tree.map(np.testing.assert_array_equal, extras['caches'][layer], want)
  # The predictor stages did not write: their inputs differ from the corrector's, so a cache they
  # had written would differ from the corrector-only cache at the new slot.
  wrote = ref_extras['caches'][0].k[:, 5]
  assert float(jnp.abs(wrote - extras['caches'][0].k[:, 5]).max()) > 1e-4


def test_attention_commit_false_reads_without_writing():
  model = Transformer(small_config(), rngs=nnx.Rngs(0))
  attn = model.layers[0].attn
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  pos, seg = jnp.broadcast_to(jnp.arange(3), (2, 3)), jnp.ones((2, 3), jnp.int32)
  cache = model.init_caches(2, 8)[0]
  _, cache = attn(x, pos, seg, cache)
  y_new = jax.random.normal(jax.random.key(1), (2, 1, 16))
  out_commit, written = attn(y_new, pos[:, :1] + 3, seg[:, :1], cache)
  out_read, unchanged = attn(y_new, pos[:, :1] + 3, seg[:, :1], cache, commit=False)
  np.testing.assert_allclose(out_read, out_commit, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, unchanged, cache)
  assert int(written.end) == 4 and int(unchanged.end) == 3


@pytest.mark.parametrize('stack', ['pc_rk4'])
def test_remat_keeps_values_and_gradients(stack):
  seq = tokens((2, 6))

  def loss_and_grad(remat):
    model = Transformer(small_config(stack=stack, remat=remat), rngs=nnx.Rngs(0))
    return nnx.value_and_grad(lambda m: m(seq)[0].mean())(model)

  (l0, g0), (l1, g1) = loss_and_grad('none'), loss_and_grad('full')
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


class _AuxMLP(SwiGLU):
  """SwiGLU reporting the mean of its input as aux (to see which evaluations are averaged)."""

  def __call__(self, x):
    y, _ = super().__call__(x)
    return y, {'mean_in': jnp.mean(x), 'vec': jnp.full((3,), jnp.mean(x))}


if 'pc_test_aux' not in MLP_REGISTRY:
  register_mlp('pc_test_aux')(
    lambda c, i, rngs: _AuxMLP(
      c.d_model,
      c.d_ff,
      std=c.init_std,
      out_std=c.out_init_std,
      param_dtype=jnp.float32,
      dtype=jnp.float32,
      rngs=rngs,
    )
  )


def test_mlp_aux_is_one_entry_per_layer_averaged_over_evaluations():
  cfg = small_config(stack='pc_rk2', mlp='pc_test_aux', num_layers=3)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 4, 16))
  pos, seg = jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32)
  seen = []

  def block(inp, *args, **kwargs):
    out = model.layers[0](inp, *args, **kwargs)
    seen.append(float(out[1]['mean_in']))
    return out

  _, _, aux, _ = model.stack.step(0, block, x, model.stack.init_history(x), pos, seg)
  assert len(seen) == 3
  np.testing.assert_allclose(float(aux['mean_in']), np.mean(seen), rtol=1e-5)
  assert aux['vec'].shape == (3,)
  _, extras = model(tokens((1, 4)))
  assert len(extras['mlp_aux']) == 3


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(stack='pc_euler'), "model.stack='pc_euler' is not a known layer stack"),
    (dict(stack='pc_rk3'), 'RK order 3 is not supported'),
    (dict(stack='ode_rk8'), 'RK order 8 is not supported'),
    (dict(stack='ode_rk4_gated'), 'only for ode_rk2'),
    (dict(stack='pc_rk2_gated'), 'only for ode_rk2'),
    (dict(stack='pc_rk2', pc_alpha='per_head'), "model.pc_alpha='per_head' is not one of"),
    (dict(stack='pc_rk2', pc_cache='none'), "model.pc_cache='none' is not one of"),
  ],
)
def test_bad_stack_configs_are_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    small_config(**overrides)


def test_rk_stages_rejects_other_orders():
  with pytest.raises(ValueError, match='RK order 3 is not supported'):
    pc.rk_stages(Recorder(), x1, 3)


def test_pc_layernorms_use_their_own_epsilon_as_released():
  """The PC LayerNorms take `pc_norm_eps` (1e-5 as released), the RMSNorms `norm_eps` (1e-6)."""
  model = Transformer(small_config(stack='pc_rk2'), rngs=nnx.Rngs(0))
  stack = model.stack
  norms = [*stack.stage_norms, *stack.pred_norms, *stack.corr_norms]
  assert {n.eps for n in norms} == {1e-5}
  assert model.final_norm.eps == 1e-6 and model.layers[0].attn_norm.eps == 1e-6
  # The LayerNorm output against numpy with eps 1e-5, on a low-variance input where eps matters.
  x = np.array([[0.0, 0.001, -0.001, 0.0005]], np.float32)
  ln = pc.LayerNorm(4, eps=1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x64 = x.astype(np.float64)
  want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='pc_norm_eps'):
    small_config(stack='pc_rk2', pc_norm_eps=0.0)


def test_pcformer_config_matches_the_release_epsilons():
  from kuaijax.config_lib import load_config
  from tests.conftest import REPO_ROOT

  for arg in ('', ':runlocal'):
    config = load_config(f'{REPO_ROOT}/configs/pcformer/lm.py{arg}')
    for model in config.models.values():  # every variant's model role
      cfg = TransformerConfig.from_config(model)
      assert (cfg.norm_eps, cfg.pc_norm_eps) == (1e-6, 1e-5)
