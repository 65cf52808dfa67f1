"""Expert parallelism on 8 simulated CPU devices: outputs and gradients of the exact (bucketed)
exchange equal the single-device all-experts layer, the compiled program holds an all-to-all,
capacity drops are counted, bad meshes fail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax import parallel
from kuaijax.models import expert_parallel, moe

T, D, F, E = 64, 16, 24, 8


def inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (T, D))
  router_w = jax.random.normal(ks[1], (D, E))
  w1, w3 = (0.3 * jax.random.normal(k, (E, D, F)) for k in ks[2:4])
  w2 = 0.3 * jax.random.normal(ks[4], (E, F, D))
  return x, router_w, w1, w3, w2


def assert_trees_close(a, b, atol=1e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=atol)


def layer(**options):
  cfg = moe.MoEConfig(num_experts=E, expert_d_ff=F, **options)
  return moe.MoE(D, cfg, std=0.3, out_std=0.3, rngs=nnx.Rngs(0))


def test_module_under_expert_mesh_matches_all_experts_on_one_device():
  # Uncapped Top-P (the default); one device computes every expert ('dense').
  options = dict(routing='top_p', p=0.6, num_shared_experts=1)
  graphdef, params = nnx.split(layer(**options))
  dense_graphdef, _ = nnx.split(layer(dispatch='dense', **options))
  x = jax.random.normal(jax.random.key(1), (4, T // 4, D))
  cotangent = jax.random.normal(jax.random.key(2), x.shape)

  def grad_fn(graphdef):
    def loss(params, x):
      y, aux = nnx.merge(graphdef, params)(x)
      return jnp.sum(y * cotangent) + aux['balance_loss'], (y, aux['mean_k'])

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  (_, (y1, k1)), g1 = jax.jit(grad_fn(dense_graphdef))(params, x)
  mesh = parallel.make_mesh({'expert': 8})

  def sharded(params, x):
    with parallel.axis_rules(mesh, parallel.DEFAULT_RULES):
      return grad_fn(graphdef)(params, x)

  compiled = jax.jit(sharded).lower(params, x).compile()
  assert 'all-to-all' in compiled.as_text()
  (_, (y8, k8)), g8 = compiled(params, x)
  assert 1.5 < float(k1) < 4.0  # tokens use several experts
  np.testing.assert_allclose(k8, k1)
  np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-5)
  assert_trees_close(g8, g1)


@pytest.mark.parametrize('routing', ['top_k', 'top_p'])
def test_data_and_expert_mesh_matches_and_counts_capacity_drops(routing):
  args = inputs()
  args = (args[0], 0.2 * args[1], *args[2:])  # a soft router: Top-P picks 1 to 5 experts
  mesh = parallel.make_mesh({'data': 2, 'expert': 4})

  def run(mesh, **options):
    cfg = moe.MoEConfig(num_experts=E, routing=routing, **options)

    def loss(args):
      y, aux = moe.moe_ffn(*args, cfg, mesh=mesh)
      return jnp.sum(jnp.sin(y)), (y, aux['drop_rate'])

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(args)

  (_, (y1, _)), g1 = run(None, dispatch='dense')
  (_, (y8, drop8)), g8 = run(mesh, gmm_implementation='ragged_dot')
  assert float(drop8) == 0.0
  np.testing.assert_allclose(y8, y1, rtol=1e-5, atol=1e-5)
  assert_trees_close(g8, g1)
  if routing == 'top_p':
    return

  # A small buffer: per device (8 token shards of 8 tokens) and destination shard (2 experts),
  # capacity ceil(0.5 * 8 * 2 / 4) = 2 rows; the rest of each device's assignments are dropped.
  (_, (_, drop_small)), _ = run(mesh, dispatch='capacity', capacity_factor=0.5)
  _, _, _, ids, _ = moe.route(args[0], args[1], moe.MoEConfig(num_experts=E, routing=routing))
  ids = np.asarray(ids).reshape(8, T // 8, 2)
  cap = expert_parallel.send_capacity(0.5, T // 8, 2, 4)
  assert cap == 2
  expected = sum(
    max(0, int(np.sum(ids[dev] // 2 == shard)) - cap) for dev in range(8) for shard in range(4)
  )
  assert expected > 0
  assert float(drop_small) == pytest.approx(expected / (T * 2))


def test_experts_not_divisible_by_expert_axis():
  six = moe.MoE(
    D, moe.MoEConfig(num_experts=6, expert_d_ff=F), std=0.3, out_std=0.3, rngs=nnx.Rngs(0)
  )
  mesh = parallel.make_mesh({'data': 2, 'expert': 4})
  with (
    parallel.axis_rules(mesh, parallel.DEFAULT_RULES),
    pytest.raises(
      ValueError, match='num_experts=6 is not divisible by the expert mesh axis size 4'
    ),
  ):
    six(jnp.ones((8, 4, D)))
  x, router_w, w1, w3, w2 = inputs()
  with pytest.raises(ValueError, match='cannot be split over mesh axes'):
    moe.moe_ffn(x[:12], router_w, w1, w3, w2, moe.MoEConfig(num_experts=E), mesh=mesh)
