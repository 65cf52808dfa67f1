"""MoE feed-forward: every dispatch strategy vs 'dense' (all experts) vs a per-token numpy reference
(forward and gradients), uncapped Top-P by default, bucketed buffers that never recompile, capacity
drops on a hand-made example, layer selection, training inside a Transformer, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kuaijax.models import dispatch, moe
from kuaijax.models.layers import SwiGLU
from kuaijax.models.transformer import Transformer, TransformerConfig
from kuaijax.train import lm_task
from tests.conftest import tiny_lm_config

T, D, F, E = 48, 16, 24, 6


def make_inputs(seed=0, dtype=jnp.float32, router_scale=1.0, shared=False):
  ks = jax.random.split(jax.random.key(seed), 9)
  x = jax.random.normal(ks[0], (T, D)).astype(dtype)
  router_w = router_scale * jax.random.normal(ks[1], (D, E))
  w1 = (0.3 * jax.random.normal(ks[2], (E, D, F))).astype(dtype)
  w3 = (0.3 * jax.random.normal(ks[3], (E, D, F))).astype(dtype)
  w2 = (0.3 * jax.random.normal(ks[4], (E, F, D))).astype(dtype)
  sh = None
  if shared:
    sh = tuple(
      (0.3 * jax.random.normal(k, s)).astype(dtype)
      for k, s in zip(ks[5:8], [(D, 2 * F), (D, 2 * F), (2 * F, D)])
    )
  return (x, router_w, w1, w3, w2), sh


def numpy_reference(
  x,
  router_w,
  w1,
  w3,
  w2,
  *,
  routing,
  p=0.4,
  k=2,
  k_max=0,
  renormalize=False,
  shared=None,
  bound=False,
):
  """Token by token: brute-force expert set, SwiGLU of each kept expert, raw-probability weights
  (renormalised over the kept experts with `renormalize`). With `bound`, also returns S [T, d]: per
  output element the sum of the absolute values of the terms that make it (weight x hidden unit x
  w2 entry), the scale of its rounding error in a low-precision computation."""
  x, router_w, w1, w3, w2 = (np.asarray(a, np.float64) for a in (x, router_w, w1, w3, w2))
  logits = x @ router_w
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y, scale = np.zeros_like(x), np.zeros_like(x)
  for t in range(x.shape[0]):
    order = np.argsort(-probs[t], kind='stable')
    if routing == 'top_k':
      kept = order[:k]
    else:
      kept = [e for j, e in enumerate(order) if probs[t, order[:j]].sum() <= p]
      kept = kept[: (k_max or len(order))]
    weights = probs[t, kept] / (np.sum(probs[t, kept]) if renormalize else 1.0)
    for weight, e in zip(weights, kept):
      h = x[t] @ w1[e]
      hidden = h / (1 + np.exp(-h)) * (x[t] @ w3[e])
      y[t] += weight * (hidden @ w2[e])
      scale[t] += weight * (np.abs(hidden) @ np.abs(w2[e]))
  if shared is not None:
    s1, s3, s2 = (np.asarray(a, np.float64) for a in shared)
    h = x @ s1
    hidden = h / (1 + np.exp(-h)) * (x @ s3)
    y += hidden @ s2
    scale += np.abs(hidden) @ np.abs(s2)
  return (y, scale) if bound else y


def cfg(**options):
  return moe.MoEConfig(num_experts=E, **options)


@pytest.mark.parametrize('routing,k_max', [('top_k', 0), ('top_p', 0), ('top_p', 2)])
def test_dense_dispatch_matches_numpy_reference(routing, k_max):
  args, shared = make_inputs(shared=routing == 'top_p', router_scale=0.1)
  c = cfg(routing=routing, dispatch='dense', k_max=k_max)
  y, aux = jax.jit(lambda *a: moe.moe_ffn(*a, c, shared=shared))(*args)
  ref = numpy_reference(*args, routing=routing, k_max=k_max, shared=shared)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  assert aux['experts_per_token'].shape == (T,)
  assert aux['k_hist'].shape == (c.slots + 1,)
  assert aux['expert_load'].shape == (E,)
  np.testing.assert_allclose(jnp.sum(aux['expert_load']), aux['mean_k'], rtol=1e-6)
  if routing == 'top_p' and not k_max:  # this router scale selects 1 to 4 experts per token
    assert 1.5 < float(aux['mean_k']) < 3.0 and float(aux['max_k']) >= 3
    assert float(aux['trunc_rate']) == 0.0


CASES = [
  # (routing, shared, dtype, extra options, strategies compared with 'dense'). The slow cases run
  # every strategy at these sizes; their tiny versions (the fused router, bfloat16 Top-K / Top-P
  # against float64) run in CI: test_fused_router_in_the_layer_..., test_bfloat16_strategy_...
  ('top_p', True, jnp.float32, {}, ('tiled', 'dropless', 'capacity')),  # uncapped (the default)
  ('top_k', False, jnp.float32, {}, ('tiled', 'dropless')),  # one bucket: the real gmm
  pytest.param(
    'top_p',
    False,
    jnp.float32,
    {'k_max': 4, 'router_impl': 'fused'},
    ('tiled', 'dropless'),
    marks=pytest.mark.slow,
  ),
  pytest.param(
    'top_k',
    True,
    jnp.bfloat16,
    {'renormalize': True},
    ('tiled', 'dropless', 'capacity'),
    marks=pytest.mark.slow,
  ),
  pytest.param('top_p', False, jnp.bfloat16, {}, ('tiled', 'dropless'), marks=pytest.mark.slow),
]


@pytest.mark.parametrize('routing,shared,dtype,extra,strategies', CASES)
def test_strategies_match_dense_forward_and_gradients(routing, shared, dtype, extra, strategies):
  args, sh = make_inputs(seed=1, dtype=dtype, shared=shared, router_scale=0.4)
  cotangent = jax.random.normal(jax.random.key(7), (T, D))

  def run(dispatch):
    # capacity T: nothing can be dropped. Top-P 'dropless' compiles one program per bucket:
    # XLA's ragged_dot compiles fast (pallas_kernels.gmm is tested on its own).
    fast = dict(gmm_implementation='ragged_dot') if routing == 'top_p' else {}
    c = cfg(routing=routing, dispatch=dispatch, capacity_factor=float(E), **fast, **extra)

    def loss(args):
      y, aux = moe.moe_ffn(*args, c, shared=sh)
      # The balance loss sends gradients to the router through the probabilities too.
      return jnp.sum(y.astype(jnp.float32) * cotangent) + aux['balance_loss'], (y, aux)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(args)

  (_, (y_ref, aux_ref)), g_ref = run('dense')
  if dtype == jnp.float32:
    ref = numpy_reference(*args, routing=routing, k_max=extra.get('k_max', 0), shared=sh)
    np.testing.assert_allclose(y_ref, ref, rtol=1e-4, atol=1e-4)
  tol = dict(rtol=1e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
  for name in strategies:
    (_, (y, aux)), grads = run(name)
    assert y.dtype == dtype
    assert float(aux['drop_rate']) == 0.0
    np.testing.assert_allclose(
      np.asarray(y, np.float32), np.asarray(y_ref, np.float32), **tol, err_msg=name
    )
    for arg, a, b in zip(['x', 'router_w', 'w1', 'w3', 'w2'], grads, g_ref):
      scale = max(1.0, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
      np.testing.assert_allclose(
        np.asarray(a, np.float32) / scale,
        np.asarray(b, np.float32) / scale,
        **tol,
        err_msg=f'{name}: d{arg}',
      )
    assert float(jnp.max(jnp.abs(grads[1]))) > 0  # the router learns


# Tiny sizes for the fused-router and bfloat16 checks: compilation, not arithmetic, sets their time.
TINY = (16, 8, 16, 4)  # tokens, d, expert d_ff, experts


def tiny_inputs(seed, dtype=jnp.float32, router_scale=1.0, shared=False):
  """`make_inputs` at the TINY sizes, drawn in numpy (eager jax.random compiles per shape: slow);
  also a cotangent for y."""
  t, d, f, e = TINY
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(np.asarray(0.3 * rng.standard_normal(shape), dtype))
  x = jnp.asarray(np.asarray(rng.standard_normal((t, d)), dtype))
  router_w = jnp.asarray(router_scale * rng.standard_normal((d, e)), jnp.float32)
  args = (x, router_w, draw(e, d, f), draw(e, d, f), draw(e, f, d))
  sh = (draw(d, 2 * f), draw(d, 2 * f), draw(2 * f, d)) if shared else None
  return args, sh, jnp.asarray(rng.standard_normal((t, d)), jnp.float32)


def _grads(routing, strategy, args, shared, cotangent, **options):
  """jit(value_and_grad) of sum(y * cotangent) + balance + z-loss (the router learns through its
  kept weights and through the probabilities / logits of the aux losses): (y, aux, grads)."""
  fast = dict(gmm_implementation='ragged_dot') if routing == 'top_p' else {}
  num_experts = args[1].shape[1]
  c = moe.MoEConfig(
    num_experts=num_experts,
    routing=routing,
    dispatch=strategy,
    capacity_factor=float(num_experts),  # nothing can be dropped
    **fast,
    **options,
  )

  def loss(args):
    y, aux = moe.moe_ffn(*args, c, shared=shared)
    aux_loss = aux['balance_loss'] + aux['router_z_loss']
    return jnp.sum(y.astype(jnp.float32) * cotangent) + aux_loss, (y, aux)

  (_, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
  return y, aux, grads


def test_fused_router_in_the_layer_matches_reference_forward_and_gradients():
  """router_impl='fused' (pallas_kernels.topp_router, custom VJP) inside moe_ffn with the exact
  tiled dispatch (the layer's choice on CPU), capped Top-P: the output equals the per-token float64
  reference, the gradients those of the unfused kuaijax.routing router over all experts."""
  args, _, cotangent = tiny_inputs(0, router_scale=0.4)
  options = dict(p=0.8, k_max=2)
  ref = numpy_reference(*args, routing='top_p', **options)
  _, _, g_ref = _grads('top_p', 'dense', args, None, cotangent, router_impl='jnp', **options)
  y, aux, grads = _grads('top_p', 'tiled', args, None, cotangent, router_impl='fused', **options)
  # float32 throughout (|y| <= 1.2, gradients <= 7): a few float32 ulps (measured <= 7e-7).
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=2e-6)
  # k_max=2 cuts half of the Top-P sets; other tokens keep one expert: both paths are used.
  assert float(aux['trunc_rate']) == 0.5 and float(aux['mean_k']) == 1.8125
  for name, a, b in zip(['x', 'router_w', 'w1', 'w3', 'w2'], grads, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=f'd{name}')
  assert float(jnp.max(jnp.abs(grads[1]))) > 0  # the router learns


BF16_CASES = [
  # (routing, shared expert, options, strategy); uncapped Top-P (p=0.4) is the default routing.
  # 'dropless' (the layer's choice on GPU; for Top-K one bucket: the real gmm) and 'tiled' (its
  # choice on CPU); the slow CASES above compare every strategy with 'dense' in bfloat16.
  ('top_k', True, {'renormalize': True}, 'dropless'),
  ('top_p', False, {}, 'tiled'),
]


@pytest.mark.parametrize('routing,shared,options,strategy', BF16_CASES)
def test_bfloat16_strategy_matches_float64_reference(routing, shared, options, strategy):
  """bfloat16 experts (router in float32) against the exact function of the same bfloat16 inputs:
  the per-token float64 reference for y, float32 all-experts gradients for the gradients."""
  # A soft router for Top-P: about 2 experts per token.
  scale = 0.4 if routing == 'top_k' else 0.1
  args, sh, cotangent = tiny_inputs(0, jnp.bfloat16, router_scale=scale, shared=shared)
  up = lambda arrays: None if arrays is None else tuple(a.astype(jnp.float32) for a in arrays)
  k = dict(routing=routing, shared=up(sh), bound=True, renormalize=bool(options))
  ref, size = numpy_reference(*up(args), **k)
  _, aux32, g32 = _grads(routing, 'dense', up(args), up(sh), cotangent, **options)
  if routing == 'top_p':
    assert 1.5 < float(aux32['mean_k']) < 3.0  # several experts per token are summed
  slots = 2 if routing == 'top_k' else TINY[3]
  # bfloat16 keeps 8 significant bits: every rounding of a stored value is off by at most
  # u = 2^-8 (half its epsilon 2^-7) of it. The dot products accumulate in float32 on XLA:CPU
  # (their D = 8 and F = 16 terms add ~16 * 2^-24: nothing), so the error of y comes from the
  # bfloat16 roundings along each term's path: x @ w1, x @ w3, silu, the gate product, the w2
  # product, the routing weight product (6), the additions over the slots and of the shared expert
  # (slots), the final cast (1): |y - y64| <= n u S with n = 6 + slots + 1 and S the sum of |terms|
  # of that output element (measured: <= 1.2 u S). A lost expert, a missing renormalisation or
  # another p is off by 27 to 650 u S (measured).
  n = 6 + slots + 1
  u = 2.0**-8
  y, aux, grads = _grads(routing, strategy, args, sh, cotangent, **options)
  assert y.dtype == jnp.bfloat16 and float(aux['drop_rate']) == 0.0
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), n * u * size + 1e-30)
  # A gradient entry is a float32 sum over tokens of products of bfloat16-rounded backward
  # values, each with the same n roundings: within n u of the largest entry (measured <= 1.9 u).
  for arg, a, b in zip(['x', 'router_w', 'w1', 'w3', 'w2'], grads, g32):
    b = np.asarray(b, np.float32)
    err = np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b))
    assert err <= n * u, f'd{arg} off by {err:.4f} of its largest entry'


def test_bucket_change_does_not_recompile():
  """Selections of very different sizes hit different buffer sizes in one compiled program."""
  args, _ = make_inputs(seed=2)
  cotangent = jax.random.normal(jax.random.key(8), (T, D))
  traces = []

  def loss(args, c):
    traces.append(c.dispatch)
    y, aux = moe.moe_ffn(*args, c)
    return jnp.sum(y * cotangent), aux['mean_k']

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  buckets = dispatch.bucket_sizes(T, T * E)
  hit = set()
  bucketed = cfg(dispatch='dropless', gmm_implementation='ragged_dot')
  for scale in (8.0, 1.0, 0.3, 0.0):  # sharp -> flat router: from ~1 to ~3 experts per token
    a = (args[0], scale * args[1], *args[2:])
    (_, ref_k), ref = step(a, cfg(dispatch='dense'))
    for c in (bucketed, cfg(dispatch='tiled')):
      (_, mean_k), grads = step(a, c)
      np.testing.assert_allclose(mean_k, ref_k)
      for u, v in zip(grads, ref):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=2e-5)
    hit.add(int(np.searchsorted(buckets, round(float(mean_k) * T))))
  assert len(hit) >= 3, (hit, buckets)
  assert sorted(traces) == ['dense', 'dropless', 'tiled']  # one trace each


def test_group_positions_is_a_stable_sort_by_expert():
  rng = np.random.default_rng(0)
  ids = np.stack([rng.permutation(E + 3)[:4] for _ in range(T)]).astype(np.int32)
  ids = np.minimum(ids, E)  # ids >= E are empty slots (sentinel E)
  sizes, rows = dispatch.group_positions(jnp.asarray(ids), E)
  flat = ids.reshape(-1)
  order = np.argsort(flat, kind='stable')
  expected = np.full(flat.shape, flat.size)
  expected[order[: int(np.sum(flat < E))]] = np.arange(int(np.sum(flat < E)))
  np.testing.assert_array_equal(np.asarray(rows).reshape(-1), expected)
  np.testing.assert_array_equal(sizes, np.bincount(flat[flat < E], minlength=E))
  assert dispatch.bucket_sizes(48, 48 * 6)[0] == 48 and dispatch.bucket_sizes(48, 288)[-1] == 288


def test_uncapped_by_default_and_truncation_only_when_asked():
  args, _ = make_inputs()
  flat = (args[0], 0.0 * args[1], *args[2:])  # uniform router: p=0.4 of 1/6 each keeps 3 experts
  _, aux = moe.moe_ffn(*flat, cfg(dispatch='dense'))
  assert float(aux['mean_k']) == 3.0 and float(aux['trunc_rate']) == 0.0
  _, aux = moe.moe_ffn(*flat, cfg(dispatch='dense', k_max=2))
  assert float(aux['mean_k']) == 2.0 and float(aux['trunc_rate']) == 1.0
  _, aux = moe.moe_ffn(*flat, cfg(dispatch='dense', k_max=3))
  assert float(aux['trunc_rate']) == 0.0  # k_max = the set size cuts nothing
  assert cfg().slots == E and cfg(k_max=2).slots == 2 and cfg(routing='top_k', k=3).slots == 3


def test_capacity_drops_lowest_weights_and_counts_them():
  # Four tokens, two experts, Top-1: every token prefers expert 0 with weight sigmoid(2 a_t).
  a = jnp.array([0.5, 2.0, 1.0, 0.2])
  x = jnp.stack([a, jnp.zeros(4)], axis=1)
  router_w = jnp.array([[1.0, -1.0], [0.0, 0.0]])
  ks = jax.random.split(jax.random.key(3), 3)
  w1, w3 = (jax.random.normal(k, (2, 2, 3)) for k in ks[:2])
  w2 = jax.random.normal(ks[2], (2, 3, 2))

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def run(capacity_factor, dispatch='capacity'):
    c = moe.MoEConfig(
      num_experts=2, routing='top_k', k=1, dispatch=dispatch, capacity_factor=capacity_factor
    )
    return moe.moe_ffn(x, router_w, w1, w3, w2, c)

  # capacity = ceil(0.5 * 4 tokens * 1 slot / 2 experts) = 1 row per expert.
  y, aux = run(0.5)
  assert float(aux['drop_rate']) == pytest.approx(3 / 4)
  # Only token 1 (largest weight) is served; the others lose their only expert.
  full, _ = run(1.0, 'dense')
  np.testing.assert_allclose(y[1], full[1], rtol=1e-6)
  np.testing.assert_array_equal(y[jnp.array([0, 2, 3])], 0.0)
  # capacity 2 (factor 1): tokens 1 and 2 are kept, 2 of 4 dropped.
  y2, aux2 = run(1.0)
  assert float(aux2['drop_rate']) == pytest.approx(2 / 4)
  np.testing.assert_allclose(y2[jnp.array([1, 2])], full[jnp.array([1, 2])], rtol=1e-6)
  np.testing.assert_array_equal(y2[jnp.array([0, 3])], 0.0)


def test_auto_dispatch_never_computes_unselected_experts():
  exact = 'tiled' if jax.default_backend() == 'cpu' else 'dropless'
  assert cfg(routing='top_p', p=1.0).strategy == exact  # even when p keeps every expert
  assert cfg(routing='top_k', k=2).strategy == exact
  assert cfg(routing='top_k', k=E).strategy == 'dense'  # every expert is selected anyway
  assert cfg(dispatch='capacity').strategy == 'capacity'


def moe_model_config(**options):
  config = tiny_lm_config()
  model = config.model.to_dict()
  model.update(
    mlp='moe',
    mlp_options=dict(num_experts=4, expert_d_ff=32, routing='top_p', p=0.5, **options),
  )
  return model


def test_layer_selection_and_parameter_layout():
  model_cfg = moe_model_config(
    expert_frequency=2, first_dense_layers=1, num_shared_experts=1, dispatch='dense'
  )
  model_cfg['num_layers'] = 4
  model = Transformer(TransformerConfig.from_config(model_cfg), rngs=nnx.Rngs(0))
  kinds = [type(block.mlp) for block in model.layers]
  assert kinds == [SwiGLU, moe.MoE, SwiGLU, moe.MoE]
  assert model.layers[0].mlp.w1.shape == (model_cfg['d_model'], model_cfg['d_ff'])
  layer = model.layers[1].mlp
  d = model_cfg['d_model']
  assert layer.w1.shape == (4, d, 32) and layer.w2.shape == (4, 32, d)
  assert layer.w1.get_metadata()['logical_axes'] == ('expert', 'embed', 'mlp')
  assert layer.w2.get_metadata()['logical_axes'] == ('expert', 'mlp', 'embed')
  assert layer.router.shape == (d, 4) and layer.router.get_value().dtype == jnp.float32
  assert layer.shared_w1.shape == (d, 32)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, model_cfg['vocab_size'])
  _, extras = nnx.jit(lambda m, t: m(t))(model, tokens)
  assert [bool(a) for a in extras['mlp_aux']] == [False, True, False, True]
  assert extras['mlp_aux'][1]['experts_per_token'].shape == (2, 8)
  hash(nnx.split(model)[0])  # graphdefs must stay hashable: jit static args and cache keys
  model_cfg['mlp_options'].pop('expert_d_ff')  # 0: the model's d_ff
  model = Transformer(TransformerConfig.from_config(model_cfg), rngs=nnx.Rngs(0))
  assert model.layers[1].mlp.w1.shape == (4, d, model_cfg['d_ff'])


def test_moe_transformer_trains():
  config = TransformerConfig.from_config(moe_model_config())
  model = Transformer(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size, (4, 33)).astype(np.int32)
  batch = {
    'inputs': tokens[:, :-1],
    'targets': tokens[:, 1:],
    'segment_ids': np.ones((4, 32), np.int32),
    'positions': np.broadcast_to(np.arange(32, dtype=np.int32), (4, 32)),
    'loss_mask': np.ones((4, 32), np.float32),
  }
  loss_fn = lm_task.lm_loss_fn(aux_weights={'balance_loss': 1e-2, 'entropy_loss': 1e-4})

  @nnx.jit
  def step(model, optimizer, batch):
    (loss, metrics), grads = nnx.value_and_grad(lambda m: loss_fn(m, batch, None), has_aux=True)(
      model
    )
    optimizer.update(model, grads)
    return loss, metrics, grads

  losses = []
  for _ in range(3):
    loss, metrics, grads = step(model, optimizer, batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert 'aux/balance_loss' in metrics and 1.0 <= float(metrics['aux/mean_k']) <= 4.0
  for name in ('router', 'w1', 'w3', 'w2'):
    assert float(jnp.max(jnp.abs(getattr(grads.layers[0].mlp, name)[...]))) > 0


BAD = [
  ({'p': 0.0}, 'p=0.0'),
  ({'p': 1.5}, 'p=1.5'),
  ({'k': 0}, 'k=0'),
  ({'k': E + 1}, f'k={E + 1}'),
  ({'k_max': E + 1}, f'k_max={E + 1}'),
  ({'k_max': -1}, 'k_max=-1'),
  ({'capacity_factor': 0.0}, 'capacity_factor=0.0'),
  ({'capacity_factor': -1}, 'capacity_factor=-1'),
  ({'routing': 'top_q'}, "routing='top_q'"),
  ({'dispatch': 'magic'}, "dispatch='magic'"),
  ({'router_impl': 'fast'}, "router_impl='fast'"),
  ({'router_impl': 'fused', 'routing': 'top_k'}, "router_impl='fused' needs routing='top_p'"),
  ({'expert_frequency': 0}, 'expert_frequency=0'),
]


@pytest.mark.parametrize('options,message', BAD)
def test_bad_options_name_the_field(options, message):
  with pytest.raises(ValueError, match='model.mlp_options.' + message.replace('[', r'\[')):
    moe.MoEConfig.from_options(dict(num_experts=E, **options))


def test_bad_layer_options():
  with pytest.raises(ValueError, match=r"unknown keys \['n_experts'\]"):
    moe.MoEConfig.from_options({'num_experts': 4, 'n_experts': 4})
  with pytest.raises(ValueError, match='num_experts is required'):
    moe.MoEConfig.from_options({'k': 2})
  args, _ = make_inputs()
  with pytest.raises(ValueError, match='w2'):
    moe.moe_ffn(*args[:4], args[4][:, :, :-1], cfg())
  with pytest.raises(ValueError, match='router_w'):
    moe.moe_ffn(*args, moe.MoEConfig(num_experts=E + 1))
