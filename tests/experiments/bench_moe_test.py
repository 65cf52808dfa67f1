"""bench_moe's baseline: the original Dynamic_MoE loop over experts equals the MoE layer (all
experts computed) in forward and gradients, and its token lists are the Top-P selection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_moe
from kuaijax import routing
from kuaijax.models import moe

T, D, F, E = 40, 8, 12, 6


def test_original_loop_equals_the_layer_and_its_selection():
  ks = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(ks[0], (T, D))
  router_w = 0.3 * jax.random.normal(ks[1], (D, E))
  w1, w3 = (0.3 * jax.random.normal(k, (E, D, F)) for k in ks[2:4])
  w2 = 0.3 * jax.random.normal(ks[4], (E, F, D))
  shared = tuple(0.3 * jax.random.normal(k, s) for k, s in zip(ks[5:8], [(D, F), (D, F), (F, D)]))
  params = (x, router_w, w1, w3, w2, *shared)
  probs = np.asarray(jax.nn.softmax(x @ router_w, axis=-1))
  tokens, slots = bench_moe.top_p_assignments(probs, 0.4)
  _, ids = routing.top_p(jnp.asarray(probs), p=0.4)
  for e in range(E):  # the same (token, slot) pairs as the layer's routing
    t, s = np.nonzero(np.asarray(ids) == e)
    np.testing.assert_array_equal(tokens[e], t)
    np.testing.assert_array_equal(slots[e], s)
  assert sum(len(t) for t in tokens) > T  # several experts for some tokens
  loop = functools.partial(bench_moe.original_loop, p=0.4, tokens=tokens, slots=slots)
  cfg = moe.MoEConfig(num_experts=E, dispatch='dense', num_shared_experts=1)
  layer = functools.partial(bench_moe._apply, cfg=cfg)
  cotangent = jax.random.normal(jax.random.key(1), (T, D))
  grads = [
    jax.jit(jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=range(8)))(
      *params
    )
    for f in (loop, layer)
  ]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
