"""gmm / tgmm: every implementation that runs on CPU against the pure-jnp reference, forward and gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gmm import gmm, pallas_gpu, pallas_tpu, reference, tgmm
from tests.pallas_kernels.lowering import lowered_text

# (m, k, n, group_sizes): empty groups, groups smaller than a tile, m not a multiple of the tile, rows past
# sum(group_sizes), a single group, all groups empty.
CASES = {
  'empty_tiny_trailing': (64, 32, 48, (10, 0, 3, 30)),
  'one_group_ragged_m': (50, 16, 24, (50,)),
  'empty_ends': (37, 24, 40, (0, 5, 0, 32, 0)),
  'all_empty': (24, 16, 16, (0, 0, 0)),
}
TILING = (
  16,
  16,
  16,
)  # several tiles per case; the default tiling is covered by test_default_tiling
TOL = {
  jnp.float32: 2e-5,
  jnp.bfloat16: 1.6e-2,
}  # f32: summation order; bf16: 2 ulp of the rounded output


def _inputs(case, dtype, seed=0):
  m, k, n, sizes = CASES[case]
  keys = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
  rhs = (jax.random.normal(keys[1], (len(sizes), k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
  ct = jax.random.normal(keys[2], (m, n), jnp.float32)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32), ct


def _assert_close(actual, expected, dtype):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  assert actual.shape == expected.shape
  tol = TOL[dtype]
  np.testing.assert_array_less(np.abs(actual - expected), tol * (1 + np.abs(expected)))


def _out_and_grads(fn, lhs, rhs, sizes, ct):
  """(fn(lhs, rhs, sizes), d lhs, d rhs) for the cotangent ct, in one compiled program."""

  def run(lhs, rhs, sizes, ct):
    out, vjp = jax.vjp(lambda x, w: fn(x, w, sizes), lhs, rhs)
    return (out, *vjp(ct.astype(out.dtype)))

  return jax.jit(run)(lhs, rhs, sizes, ct)


@functools.cache
def _reference_out_and_grads(case, dtype):
  return _out_and_grads(reference.gmm, *_inputs(case, dtype))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('implementation', ['xla', 'interpret'])
def test_gmm_forward_and_grads_match_reference(implementation, case, dtype):
  lhs, rhs, sizes, ct = _inputs(case, dtype)
  fn = lambda x, w, s: gmm(x, w, s, implementation=implementation, tiling=TILING)
  out, d_lhs, d_rhs = _out_and_grads(fn, lhs, rhs, sizes, ct)
  assert out.dtype == dtype and d_lhs.dtype == dtype and d_rhs.dtype == dtype
  for got, want in zip((out, d_lhs, d_rhs), _reference_out_and_grads(case, dtype), strict=True):
    _assert_close(got, want, dtype)
  used = int(sizes.sum())
  np.testing.assert_array_equal(np.asarray(out[used:], np.float32), 0)  # rows past the groups
  np.testing.assert_array_equal(np.asarray(d_lhs[used:], np.float32), 0)  # ... and their gradient


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('implementation', ['xla', 'interpret'])
def test_tgmm_matches_reference(implementation, dtype):
  lhs, rhs, sizes, ct = _inputs('empty_tiny_trailing', dtype)
  grad = ct.astype(dtype)
  out = jax.jit(lambda x, g, s: tgmm(x, g, s, implementation=implementation, tiling=TILING))(
    lhs, grad, sizes
  )
  assert out.shape == rhs.shape and out.dtype == dtype
  _assert_close(out, reference.tgmm(lhs, grad, sizes), dtype)
  np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0)  # the empty group


def test_tgmm_grads_match_reference():
  lhs, _, sizes, ct = _inputs('empty_tiny_trailing', jnp.float32)
  cot = jax.random.normal(jax.random.key(5), (len(sizes), lhs.shape[1], ct.shape[1]))
  fn = lambda x, g, s: tgmm(x, g, s, implementation='xla', tiling=TILING)
  grads = lambda f: jax.jit(jax.grad(lambda x, g: jnp.vdot(f(x, g, sizes), cot), argnums=(0, 1)))
  for a, b in zip(grads(fn)(lhs, ct), grads(reference.tgmm)(lhs, ct), strict=True):
    _assert_close(a, b, jnp.float32)


def test_second_order_grads_match_reference():
  lhs, rhs, sizes, _ = _inputs('empty_tiny_trailing', jnp.float32)

  def second(fn):
    inner = lambda x, w: jnp.sum(jnp.sin(fn(x, w, sizes)))
    outer = lambda x, w: jnp.sum(jnp.cos(jax.grad(inner)(x, w)))
    return jax.jit(jax.grad(outer, argnums=(0, 1)))(lhs, rhs)

  got = second(lambda x, w, s: gmm(x, w, s, implementation='xla', tiling=TILING))
  for a, b in zip(got, second(reference.gmm), strict=True):
    _assert_close(a, b, jnp.float32)


@pytest.mark.parametrize('implementation', ['xla', 'interpret'])
def test_default_tiling_and_f32_output(implementation):
  lhs, rhs, sizes, _ = _inputs('empty_tiny_trailing', jnp.bfloat16)
  y = gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32, implementation=implementation)
  assert y.dtype == jnp.float32
  _assert_close(y, reference.gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32), jnp.float32)


def test_auto_is_xla_on_cpu():
  lhs, rhs, sizes, _ = _inputs('empty_ends', jnp.float32)
  np.testing.assert_array_equal(
    gmm(lhs, rhs, sizes, implementation='auto'), gmm(lhs, rhs, sizes, implementation='xla')
  )


@pytest.mark.parametrize('implementation', ['xla', 'interpret'])
def test_new_group_sizes_do_not_recompile(implementation):
  lhs, rhs, _, ct = _inputs('empty_tiny_trailing', jnp.float32)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(lhs, rhs, sizes):
    fn = lambda x, w: gmm(x, w, sizes, implementation=implementation, tiling=TILING)
    return jax.grad(lambda x, w: jnp.vdot(fn(x, w), ct), argnums=(0, 1))(lhs, rhs)

  for sizes in [(10, 0, 3, 30), (64, 0, 0, 0), (0, 1, 2, 3), (16, 16, 16, 16)]:
    sizes = jnp.asarray(sizes, jnp.int32)
    got = step(lhs, rhs, sizes)
    want = _out_and_grads(reference.gmm, lhs, rhs, sizes, ct)[1:]
    for a, b in zip(got, want, strict=True):
      _assert_close(a, b, jnp.float32)


def test_traced_bad_group_sizes_are_clipped():
  """Traced sizes cannot be checked: negative counts as 0, groups past row m are cut at m (documented)."""
  lhs, rhs, _, _ = _inputs('empty_tiny_trailing', jnp.float32)
  fn = jax.jit(lambda s: gmm(lhs, rhs, s, implementation='xla'))
  y = fn(jnp.asarray([-5, 10, 100, 7], jnp.int32))
  expected = reference.gmm(lhs, rhs, jnp.asarray([0, 10, 54, 0], jnp.int32))
  _assert_close(y, expected, jnp.float32)


@pytest.mark.parametrize(
  'case,dtype',
  [('empty_tiny_trailing', jnp.float32), ('empty_ends', jnp.bfloat16)],
  ids=['f32', 'bf16'],
)
def test_tpu_kernel_in_interpret_mode(case, dtype):
  """The Mosaic kernels' bodies, run by the Pallas interpreter (8-row tiles; k, n padded to a block)."""
  lhs, rhs, sizes, ct = _inputs(case, dtype)
  tiling = (16, 128, 128)
  out = pallas_tpu.gmm(lhs, rhs, sizes, preferred_element_type=dtype, tiling=tiling, interpret=True)
  _assert_close(out, reference.gmm(lhs, rhs, sizes), dtype)
  grad = ct.astype(dtype)
  t = pallas_tpu.tgmm(lhs, grad, sizes, preferred_element_type=dtype, tiling=tiling, interpret=True)
  _assert_close(t, reference.tgmm(lhs, grad, sizes), dtype)


def test_kernels_lower_for_gpu_and_tpu():
  """Both kernels go through the Triton and Mosaic lowerings (for abstract devices: none needed)."""
  m, k, n, num_groups = 300, 256, 384, 4
  lhs = jnp.zeros((m, k), jnp.bfloat16)
  rhs = jnp.zeros((num_groups, k, n), jnp.bfloat16)
  grad = jnp.zeros((m, n), jnp.bfloat16)
  sizes = jnp.zeros((num_groups,), jnp.int32)
  for platform, module, marker in [
    ('cuda', pallas_gpu, 'triton'),
    ('tpu', pallas_tpu, 'tpu_custom_call'),
  ]:
    for fn, operand in [(module.gmm, rhs), (module.tgmm, grad)]:
      hlo = lowered_text(
        platform,
        lambda x, y, s, fn=fn: fn(x, y, s, preferred_element_type=jnp.float32),
        lhs,
        operand,
        sizes,
      )
      assert marker in hlo, (platform, fn.__name__)


def _assert_kernel_matches_reference(dtype, tol):
  m, k, n, sizes = 1000, 256, 384, jnp.asarray([100, 0, 7, 600, 200], jnp.int32)
  keys = jax.random.split(jax.random.key(1), 3)
  lhs = jax.random.normal(keys[0], (m, k)).astype(dtype)
  rhs = (jax.random.normal(keys[1], (5, k, n)) / np.sqrt(k)).astype(dtype)
  ct = jax.random.normal(keys[2], (m, n))
  fn = lambda x, w, s: gmm(x, w, s, implementation='pallas')
  got = _out_and_grads(fn, lhs, rhs, sizes, ct)
  want = _out_and_grads(reference.gmm, lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, ct)
  for a, b in zip(got, want, strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_array_less(np.abs(a - b), tol * (1 + np.abs(b)))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
def test_gpu_kernel_matches_reference(dtype):
  _assert_kernel_matches_reference(dtype, 2e-2)  # f32 dots may run in TF32 on the GPU


@pytest.mark.skipif(jax.default_backend() != 'tpu', reason='needs a TPU')
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
def test_tpu_kernel_matches_reference(dtype):
  _assert_kernel_matches_reference(dtype, 2e-2)  # the MXU's default f32 precision is bf16 passes


def test_bad_inputs_raise_clear_errors():
  lhs, rhs, sizes, _ = _inputs('empty_tiny_trailing', jnp.float32)
  bad = [
    ((lhs[:, :5], rhs, sizes), {}, ValueError, 'lhs k=5 does not match rhs k=32'),
    ((lhs, rhs, sizes[:3]), {}, ValueError, 'group_sizes has 3 entries but rhs has G=4'),
    ((lhs[None], rhs, sizes), {}, ValueError, 'need lhs \\[m, k\\] and rhs \\[G, k, n\\]'),
    ((lhs, rhs, sizes[None]), {}, ValueError, 'group_sizes must be 1-D'),
    ((lhs, rhs, sizes.at[1].set(-1)), {}, ValueError, 'group_sizes must be >= 0'),
    (
      (lhs, rhs, sizes.at[0].set(40)),
      {},
      ValueError,
      'sum\\(group_sizes\\) = 73 exceeds the 64 rows',
    ),
    ((lhs, rhs, sizes.astype(jnp.float32)), {}, TypeError, 'integer dtype'),
    ((lhs, rhs, sizes), {'implementation': 'cuda'}, ValueError, 'is not one of'),
    ((lhs, rhs, sizes), {'implementation': 'pallas'}, ValueError, 'needs a GPU or TPU'),
    ((lhs, rhs, sizes), {'tiling': (16, 16)}, ValueError, 'tiling must be None or three positive'),
  ]
  for args, kwargs, error, message in bad:
    with pytest.raises(error, match=message):
      gmm(*args, **kwargs)
  with pytest.raises(ValueError, match='powers of two >= 16'):
    pallas_gpu.gmm(lhs, rhs, sizes, preferred_element_type=jnp.float32, tiling=(24, 16, 16))
  with pytest.raises(ValueError, match='lhs has m=64 rows but grad has 10'):
    tgmm(lhs, jnp.zeros((10, 8)), sizes)
  with pytest.raises(ValueError, match='sum\\(group_sizes\\) = 73 exceeds'):
    tgmm(lhs, jnp.zeros((64, 8)), sizes.at[0].set(40))
