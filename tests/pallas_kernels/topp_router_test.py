"""topp_router: every implementation against the unfused kuaijax.routing reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.topp_router import pallas_tpu, reference, topp_router

IMPLS = ('xla', 'interpret')


def inputs(t, d, e, dtype=jnp.float32, seed=0, scale=0.5):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(t, d)), dtype)
  w = jnp.asarray(rng.normal(size=(d, e)) * scale / np.sqrt(d) * 4, dtype)
  return x, w


def decisive(logits, p, k_max):
  """Tokens whose selection is not within float32 rounding of a tie or of the threshold p."""
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)), np.float64)
  top = -np.sort(-probs, axis=-1)
  exclusive = np.cumsum(top, axis=-1) - top
  margin = np.abs(exclusive[:, : k_max + 1] - p).min(-1)
  gaps = np.abs(np.diff(top[:, : k_max + 1], axis=-1)).min(-1, initial=1.0)
  return (margin > 1e-5) & (gaps > 1e-6)


def assert_matches_reference(out, ref, p, k_max, num_experts, tol):
  weights, ids, counts, logits = (np.asarray(a) for a in out)
  r_weights, r_ids, r_counts, r_logits = (np.asarray(a) for a in ref)
  assert weights.dtype == np.float32 and logits.dtype == np.float32
  assert ids.dtype == np.int32 and counts.dtype == np.int32
  assert weights.shape == ids.shape == r_ids.shape and counts.shape == (num_experts,)
  np.testing.assert_allclose(logits, r_logits, rtol=tol, atol=tol)
  ok = decisive(r_logits, p, k_max)
  assert ok.mean() > 0.97
  np.testing.assert_array_equal(ids[ok], r_ids[ok])
  np.testing.assert_allclose(weights[ok], r_weights[ok], rtol=tol, atol=tol)
  assert np.all(weights[ids == num_experts] == 0)
  # Counts are those of the returned ids (and the reference's where every token is decisive).
  own = np.bincount(ids[ids < num_experts], minlength=num_experts)
  np.testing.assert_array_equal(counts, own)
  if ok.all():
    np.testing.assert_array_equal(counts, r_counts)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize(
  't, d, e, k_max, p, dtype',
  [
    (96, 32, 8, 4, 0.4, jnp.float32),
    (77, 48, 12, None, 0.7, jnp.float32),  # T, d, E off the block sizes; k_max > ITERATIVE_MAX_K
    (64, 64, 16, 2, 0.1, jnp.bfloat16),
  ],
)
def test_forward_matches_reference(impl, t, d, e, k_max, p, dtype):
  x, w = inputs(t, d, e, dtype)
  ref = reference.topp_router(x, w, p=p, k_max=k_max)
  out = jax.jit(lambda x, w: topp_router(x, w, p=p, k_max=k_max, implementation=impl))(x, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert_matches_reference(out, ref, p, k_max or e, e, tol)


def test_tpu_kernel_body_in_interpret_mode():
  x, w = inputs(40, 24, 8, seed=3)
  ref = reference.topp_router(x, w, p=0.4, k_max=3)
  out = pallas_tpu.forward(x, w, p=0.4, k_max=3, interpret=True)
  assert_matches_reference(out, ref, 0.4, 3, 8, 1e-5)


@pytest.mark.parametrize('impl', IMPLS)
def test_adversarial_rows(impl):
  # Uniform logits (all ties: lowest ids first, 7 of 16 at p=0.4) and one dominant expert.
  x = jnp.zeros((2, 4), jnp.float32).at[1, 0].set(1.0)
  w = jnp.zeros((4, 16), jnp.float32).at[0, 5].set(20.0)
  weights, ids, counts, _ = topp_router(x, w, p=0.4, k_max=8, implementation=impl)
  np.testing.assert_array_equal(np.asarray(ids[0]), [0, 1, 2, 3, 4, 5, 6, 16])
  np.testing.assert_array_equal(np.asarray(ids[1]), [5] + [16] * 7)
  np.testing.assert_allclose(np.asarray(weights[0, :7]), 1 / 16, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(counts), [1] * 5 + [2, 1] + [0] * 9)


@pytest.mark.parametrize('impl', IMPLS)
def test_gradients_match_reference(impl):
  x, w = inputs(50, 16, 8, seed=1)
  rng = np.random.default_rng(2)
  cw = jnp.asarray(rng.normal(size=(50, 3)), jnp.float32)
  cz = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)

  def loss(fn):
    def f(x, w):
      weights, _, _, logits = fn(x, w)
      # Kept weights, a linear term and a z-loss in the logits.
      lse = jax.nn.logsumexp(logits, axis=-1)
      return jnp.sum(weights * cw) + jnp.sum(logits * cz) * 1e-2 + jnp.mean(lse**2)

    return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)

  ref = loss(lambda x, w: reference.topp_router(x, w, p=0.5, k_max=3))
  got = loss(lambda x, w: topp_router(x, w, p=0.5, k_max=3, implementation=impl))
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_leading_dims_and_bf16_gradients():
  x, w = inputs(24, 16, 4, jnp.bfloat16, seed=4)
  weights, ids, counts, logits = topp_router(x.reshape(2, 12, 16), w, p=0.6, k_max=2)
  assert weights.shape == ids.shape == (2, 12, 2) and logits.shape == (2, 12, 4)
  assert int(counts.sum()) == int(np.sum(np.asarray(ids) < 4))
  grad = jax.jit(jax.grad(lambda x, w: topp_router(x, w, p=0.6, k_max=2)[0].sum(), (0, 1)))
  gx, gw = grad(x, w)
  assert gx.dtype == gw.dtype == jnp.bfloat16


def test_traced_once_per_shape():
  x, w = inputs(16, 8, 4)
  traces = []

  @jax.jit
  def f(x, w):
    traces.append(1)
    return topp_router(x, w, p=0.4, k_max=2)

  f(x, w)
  f(x + 1, w)
  assert len(traces) == 1


@pytest.mark.parametrize(
  'kwargs, match',
  [
    (dict(x=np.zeros((4, 8)), router_w=np.zeros((6, 4))), 'd=8'),
    (dict(x=np.zeros((4, 8)), router_w=np.zeros((8,))), 'router_w'),
    (dict(x=np.zeros((4, 8), np.int32), router_w=np.zeros((8, 4))), 'x must be floating'),
    (dict(p=0.0), 'p='),
    (dict(p=1.2), 'p='),
    (dict(k_max=0), 'k_max='),
    (dict(k_max=5), 'k_max='),
    (dict(implementation='cuda'), 'implementation='),
    (dict(implementation='pallas'), 'needs a GPU or TPU'),
  ],
)
def test_bad_input(kwargs, match):
  args = dict(x=np.zeros((4, 8), np.float32), router_w=np.zeros((8, 4), np.float32), p=0.4)
  args.update(kwargs)
  if jax.default_backend() != 'cpu' and args.get('implementation') == 'pallas':
    pytest.skip('pallas is available on this backend')
  with pytest.raises((ValueError, TypeError), match=match):
    topp_router(args.pop('x'), args.pop('router_w'), **args)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() not in ('gpu', 'tpu'), reason='needs a GPU or TPU')
def test_pallas_kernel_on_hardware():
  x, w = inputs(4096, 512, 16, jnp.bfloat16)
  ref = reference.topp_router(x, w, p=0.4, k_max=4)
  out = topp_router(x, w, p=0.4, k_max=4, implementation='pallas')
  assert_matches_reference(out, ref, 0.4, 4, 16, 2e-2)
