"""token_logprobs: forward and gradients of every CPU-runnable implementation against the
full-logits reference, the memory saving of the chunked XLA path, retracing, and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.token_logprobs import pallas_gpu, pallas_tpu, token_logprobs
from pallas_kernels.token_logprobs.reference import token_logprobs_reference
from tests.pallas_kernels.lowering import lowered_text

# (lead shape, d, V, dtype, options); V is never a multiple of the chunk except in 'even'.
CASES = {
  'batched_cap_temp': ((2, 7), 24, 300, jnp.float32, dict(temperature=0.7, soft_cap=3.0)),
  'single_token_bf16': ((1,), 32, 200, jnp.bfloat16, dict(soft_cap=5.0)),
  'even': ((16,), 16, 256, jnp.float32, dict(temperature=1.5)),
}
CHUNK = {'xla': 96, 'interpret': 64}


def _inputs(lead, d, v, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(k[0], (*lead, d)).astype(dtype)
  lm_head = (jax.random.normal(k[1], (d, v)) * 0.5).astype(dtype)
  targets = jax.random.randint(k[2], lead, 0, v)
  cotangents = (jax.random.normal(k[3], lead), jax.random.normal(k[4], lead))
  return hidden, lm_head, targets, cotangents


def _vjp(fn, hidden, lm_head, targets, cotangents):
  outs, pullback = jax.vjp(lambda h, w: fn(h, w, targets), hidden, lm_head)
  return outs, pullback(cotangents)


def _close(actual, expected, dtype, what):
  tol = dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
  scale = max(float(jnp.max(jnp.abs(expected.astype(jnp.float32)))), 1.0)
  np.testing.assert_allclose(
    np.asarray(actual, np.float32),
    np.asarray(expected, np.float32),
    rtol=tol['rtol'],
    atol=tol['atol'] * scale,
    err_msg=what,
  )


def _check_against_reference(fn, case):
  lead, d, v, dtype, opts = CASES[case]
  hidden, lm_head, targets, cot = _inputs(lead, d, v, dtype)
  (lp, ent), (dh, dw) = _vjp(fn, hidden, lm_head, targets, cot)
  ref = jax.jit(lambda h, w, y: token_logprobs_reference(h, w, y, **opts))
  (lp_r, ent_r), (dh_r, dw_r) = _vjp(ref, hidden, lm_head, targets, cot)
  assert lp.shape == ent.shape == lead and lp.dtype == ent.dtype == jnp.float32
  assert dh.dtype == hidden.dtype and dw.dtype == lm_head.dtype
  _close(lp, lp_r, jnp.float32, 'logprobs')
  _close(ent, ent_r, jnp.float32, 'entropy')
  _close(dh, dh_r, dtype, 'd hidden')
  _close(dw, dw_r, dtype, 'd lm_head')


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('implementation', ['xla', 'interpret'])
def test_forward_and_gradients_match_reference(implementation, case):
  opts = CASES[case][-1]
  fn = lambda h, w, y: token_logprobs(
    h, w, y, implementation=implementation, chunk_size=CHUNK[implementation], **opts
  )
  _check_against_reference(fn, case)


def test_tpu_kernel_in_interpreter_matches_reference():
  lead, d, v, dtype, opts = CASES['batched_cap_temp']
  hidden, lm_head, targets, (g1, g2) = _inputs(lead, d, v, dtype)
  h, y = hidden.reshape(-1, d), targets.reshape(-1)
  kw = dict(temperature=opts['temperature'], soft_cap=opts['soft_cap'], block_v=128, interpret=True)
  lp, ent, lse, mean_l = pallas_tpu.forward(h, lm_head, y, **kw)
  dh, dw = pallas_tpu.backward(h, lm_head, y, lse, mean_l, g1.reshape(-1), g2.reshape(-1), **kw)
  ref = jax.jit(lambda h, w: token_logprobs_reference(h, w, y, **opts))
  (lp_r, ent_r), pullback = jax.vjp(ref, h, lm_head)
  dh_r, dw_r = pullback((g1.reshape(-1), g2.reshape(-1)))
  for actual, expected, what in (
    (lp, lp_r, 'lp'),
    (ent, ent_r, 'ent'),
    (dh, dh_r, 'dh'),
    (dw, dw_r, 'dw'),
  ):
    _close(actual, expected, jnp.float32, what)


@pytest.mark.parametrize(
  'platform, kernels, marker',
  [('cuda', pallas_gpu, 'triton'), ('tpu', pallas_tpu, 'tpu_custom_call')],
  ids=['gpu', 'tpu'],
)
def test_kernels_lower_for_their_hardware(platform, kernels, marker):
  """Without the device: the kernels lower to Triton / Mosaic (catches unsupported ops early)."""
  t, d, v = 100, 64, 1000
  h = jax.ShapeDtypeStruct((t, d), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((d, v), jnp.bfloat16)
  y = jax.ShapeDtypeStruct((t,), jnp.int32)
  f = jax.ShapeDtypeStruct((t,), jnp.float32)
  kw = dict(temperature=0.7, soft_cap=30.0)
  fwd = lambda h, w, y: kernels.forward(h, w, y, **kw)
  bwd = lambda h, w, y, *vs: kernels.backward(h, w, y, *vs, **kw)
  for text in (
    lowered_text(platform, fwd, h, w, y),
    lowered_text(platform, bwd, h, w, y, f, f, f, f),
  ):
    assert 'token_logprobs' in text and marker in text


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() not in ('gpu', 'tpu'), reason='needs a GPU or TPU')
@pytest.mark.parametrize('case', sorted(CASES))
def test_hardware_kernel_matches_reference(case):
  opts = CASES[case][-1]
  _check_against_reference(
    lambda h, w, y: token_logprobs(h, w, y, implementation='pallas', **opts), case
  )


def test_entropy_and_logprob_closed_form_on_uniform_logits():
  """Zero weights: uniform p, so logprob = -log V and entropy = log V exactly."""
  v = 1000
  lp, ent = token_logprobs(
    jnp.ones((3, 8)),
    jnp.zeros((8, v)),
    jnp.array([0, 5, 999]),
    implementation='xla',
    chunk_size=128,
  )
  np.testing.assert_allclose(lp, -np.log(v) * np.ones(3), rtol=1e-6)
  np.testing.assert_allclose(ent, np.log(v) * np.ones(3), rtol=1e-6)


def _loss(score):
  def loss(hidden, lm_head, targets, g1, g2):
    lp, ent = score(hidden, lm_head, targets)
    return jnp.sum(g1 * lp) + jnp.sum(g2 * ent)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def test_xla_path_fwd_bwd_temp_memory_is_small():
  """Compiled fwd+bwd temporaries: chunked path < 0.5x the naive version's (logits never stored)."""
  t, d, v = 1024, 64, 8192
  shapes = (
    jax.ShapeDtypeStruct((t, d), jnp.float32),
    jax.ShapeDtypeStruct((d, v), jnp.float32),
    jax.ShapeDtypeStruct((t,), jnp.int32),
    jax.ShapeDtypeStruct((t,), jnp.float32),
    jax.ShapeDtypeStruct((t,), jnp.float32),
  )
  fused = _loss(lambda h, w, y: token_logprobs(h, w, y, implementation='xla', chunk_size=512))
  temp = lambda fn: fn.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
  naive_temp, fused_temp = temp(_loss(token_logprobs_reference)), temp(fused)
  assert naive_temp >= 2 * t * v * 4  # the naive program holds [T, V] logits (and more)
  assert fused_temp < 0.5 * naive_temp, (fused_temp, naive_temp)


def test_no_retrace_for_new_values():
  hidden, lm_head, targets, (g1, g2) = _inputs((8,), 16, 100, jnp.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(hidden, lm_head, targets, g1, g2):
    score = lambda h, w, y: token_logprobs(h, w, y, implementation='xla', chunk_size=32)
    return _loss(score)(hidden, lm_head, targets, g1, g2)

  for i in range(3):
    step(hidden + i, lm_head * (i + 1), (targets + i) % 100, g1, g2)


@pytest.mark.parametrize(
  'kwargs, error, match',
  [
    (dict(hidden=jnp.ones((4, 8)), lm_head=jnp.ones((9, 10))), ValueError, 'hidden size mismatch'),
    (dict(targets=jnp.zeros((5,), jnp.int32)), ValueError, 'targets shape'),
    (dict(targets=jnp.zeros((4,), jnp.float32)), TypeError, 'integer'),
    (dict(temperature=0.0), ValueError, 'temperature'),
    (dict(temperature=-1.0), ValueError, 'temperature'),
    (dict(soft_cap=0.0), ValueError, 'soft_cap'),
    (dict(chunk_size=0), ValueError, 'chunk_size'),
    (dict(implementation='cuda'), ValueError, 'implementation'),
  ],
)
def test_bad_input_errors(kwargs, error, match):
  args = dict(
    hidden=jnp.ones((4, 8)), lm_head=jnp.ones((8, 10)), targets=jnp.zeros((4,), jnp.int32)
  )
  args.update(kwargs)
  with pytest.raises(error, match=match):
    token_logprobs(args.pop('hidden'), args.pop('lm_head'), args.pop('targets'), **args)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU has no Pallas kernel')
def test_pallas_on_cpu_names_the_alternatives():
  with pytest.raises(ValueError, match='interpret'):
    token_logprobs(
      jnp.ones((2, 8)), jnp.ones((8, 10)), jnp.zeros((2,), jnp.int32), implementation='pallas'
    )


def test_mixed_dtypes_are_promoted():
  """bf16 hidden with an f32 head (a bf16 model with f32 params) scores like f32 inputs."""
  hidden, lm_head, targets, cot = _inputs((5,), 16, 70, jnp.float32)
  hidden = hidden.astype(jnp.bfloat16)
  score = lambda h, w, y: token_logprobs(h, w, y, implementation='xla', chunk_size=32)
  (lp, ent), (dh, dw) = _vjp(score, hidden, lm_head, targets, cot)
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  lp_r, ent_r = token_logprobs_reference(hidden.astype(jnp.float32), lm_head, targets)
  _close(lp, lp_r, jnp.float32, 'logprobs')
  _close(ent, ent_r, jnp.float32, 'entropy')


@pytest.mark.parametrize('t', [1, 8, 4096])
@pytest.mark.parametrize('d, itemsize', [(128, 4), (512, 4), (512, 2), (1024, 4), (2048, 2)])
def test_gpu_blocks_fit_shared_memory(t, d, itemsize):
  """The H200 failure (d=512 f32, blocks (32, 128): 327680 bytes) cannot be chosen again."""
  assert pallas_gpu.tile_bytes(32, 128, 512, 4) == 327680 > pallas_gpu.SMEM_BUDGET
  block_t, block_v = pallas_gpu.choose_blocks(t, d, itemsize, None)
  assert pallas_gpu.tile_bytes(block_t, block_v, d, itemsize) <= pallas_gpu.SMEM_BUDGET
  assert min(block_t, block_v) >= 16 and not block_t & (block_t - 1) and not block_v & (block_v - 1)
  assert pallas_gpu.choose_blocks(t, d, itemsize, 16)[1] == 16  # a chunk_size given is kept


def test_too_wide_for_the_gpu_kernel_takes_the_xla_path_under_auto(monkeypatch):
  """d=4096 f32 tiles fit no block size: 'auto' scores with the XLA path, 'pallas' says why."""
  from pallas_kernels.token_logprobs import api

  assert not pallas_gpu.fits(4096, 4) and pallas_gpu.choose_blocks(64, 4096, 4, None) is None
  hidden, lm_head, targets, _ = _inputs((3,), 4096, 40, jnp.float32)
  monkeypatch.setattr(api, 'resolve_implementation', lambda implementation, op: 'gpu')
  lp, ent = token_logprobs(hidden, lm_head, targets)  # would fail to lower on this CPU as 'gpu'
  lp_r, ent_r = token_logprobs_reference(hidden, lm_head, targets)
  _close(lp, lp_r, jnp.float32, 'logprobs')
  _close(ent, ent_r, jnp.float32, 'entropy')
  with pytest.raises(ValueError, match='d=4096 float32 tiles'):
    token_logprobs(hidden, lm_head, targets, implementation='pallas')
