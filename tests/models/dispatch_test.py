"""The tiled experts (`dispatch.tiled_ffn`) against a plain jnp reference, values and gradients,
with every saved-rows budget: none (all recomputed), part of the selection, all of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kuaijax import routing
from kuaijax.models import dispatch

T, D, F, E = 300, 16, 24, 5


def reference_ffn(x, weights, ids, w1, w3, w2):
  """sum over kept (token, expert) of weight * SwiGLU_e(x): every expert on every token, masked."""
  y = jnp.zeros_like(x)
  for e in range(E):
    gate = jnp.sum(jnp.where(ids == e, weights, 0.0), axis=1)
    y = y + gate[:, None] * ((jax.nn.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e])
  return y


@pytest.mark.parametrize('saved_rows', [0, 200, 10_000])
def test_tiled_ffn_matches_reference_values_and_gradients(saved_rows):
  ks = jax.random.split(jax.random.key(0), 7)
  x = jax.random.normal(ks[0], (T, D))
  probs = jax.nn.softmax(2.0 * jax.random.normal(ks[1], (T, E)), axis=-1)
  weights, ids = routing.top_p(probs, p=0.5)
  w1, w3 = (0.3 * jax.random.normal(k, (E, D, F)) for k in ks[2:4])
  w2 = 0.3 * jax.random.normal(ks[4], (E, F, D))
  cotangent = jax.random.normal(ks[5], (T, D))
  sizes, positions = dispatch.group_positions(ids, E)
  pairs = int(jnp.sum(sizes))
  assert 200 < pairs < 10_000  # the middle budget saves part of the rows, recomputes the rest

  def tiled(x, weights, w1, w3, w2):
    return dispatch.tiled_ffn(x, weights, positions, sizes, w1, w3, w2, saved_rows)

  def ref(x, weights, w1, w3, w2):
    return reference_ffn(x, weights, ids, w1, w3, w2)

  args = (x, weights, w1, w3, w2)
  y, vjp = jax.vjp(jax.jit(tiled), *args)
  y_ref, vjp_ref = jax.vjp(ref, *args)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
