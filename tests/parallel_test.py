"""Mesh resolution, logical-to-mesh rules and parameter sharding specs on 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kuaijax import parallel
from kuaijax.models.transformer import Transformer, TransformerConfig


def test_mesh_shape_fills_the_rest():
  assert parallel.mesh_shape({'data': -1, 'tensor': 2}, 8) == dict(
    data=4, fsdp=1, tensor=2, expert=1
  )


@pytest.mark.parametrize(
  'mesh, message',
  [
    ({'data': 3}, 'needs a multiple of 3 devices'),
    ({'data': -1, 'fsdp': -1}, 'at most one axis may be -1'),
    ({'model': 2}, 'unknown axes'),
    ({'data': 2, 'fsdp': 2}, 'uses 4 devices, but 8 are present'),
  ],
)
def test_bad_meshes(mesh, message):
  with pytest.raises(ValueError, match=message):
    parallel.mesh_shape(mesh, 8)


def test_logical_to_spec_dedupes_and_respects_divisibility():
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = parallel.rules_dict(parallel.DEFAULT_RULES)
  assert parallel.logical_to_spec(('batch', 'length', 'embed'), rules, mesh) == P(
    ('data', 'fsdp'), None, None
  )
  assert parallel.logical_to_spec(('embed', 'mlp'), rules, mesh) == P('fsdp', 'tensor')
  # 3 kv heads cannot be split 2 ways: replicated instead of an invalid sharding.
  assert parallel.logical_to_spec(('embed', 'kv_heads', 'kv'), rules, mesh, (8, 3, 4)) == P(
    'fsdp', None, None
  )
  with pytest.raises(ValueError, match="logical axis 'nope' has no rule"):
    parallel.logical_to_spec(('nope',), rules, mesh)
  with pytest.raises(ValueError, match='unknown mesh axes'):
    parallel.rules_dict({'embed': ('model',)})


def test_every_parameter_gets_a_sharding_on_eight_devices():
  assert len(jax.devices()) == 8
  cfg = TransformerConfig(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    d_ff=64,
    tie_embeddings=False,
  )
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract, nnx.Param)
  mesh = parallel.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  shardings = parallel.state_shardings(
    nnx.to_pure_dict(state), parallel.logical_axes_tree(state), mesh, parallel.DEFAULT_RULES
  )
  specs = jax.tree.map(lambda s: s.spec, shardings)
  assert specs['embed']['embedding'] == P('tensor', 'fsdp')
  assert specs['head'] == P('fsdp', 'tensor')
  assert specs['layers'][0]['attn']['wk'] == P('fsdp', 'tensor', None)
  assert specs['layers'][0]['attn']['wo'] == P('tensor', None, 'fsdp')
  assert specs['layers'][1]['mlp']['w2'] == P('tensor', 'fsdp')
  assert specs['final_norm']['scale'] == P(None)


def test_on_process_rows_runs_on_the_mesh_and_returns_this_process_rows():
  """Inside axis_rules the function sees a batch sharded over the mesh; the rows come back as numpy
  (here one process holds them all), for outputs sharded another way too."""
  mesh = parallel.make_mesh({'data': 4, 'tensor': 2})
  local = {'x': np.arange(16, dtype=np.float32).reshape(8, 2)}
  seen = []

  def fn(batch):
    seen.append(getattr(batch['x'], 'sharding', None))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'tensor'))
    doubled = jax.device_put(jnp.concatenate([batch['x'], batch['x']], 1) * 2, spec)
    return {'y': doubled, 'n': batch['x'].sum(1)}

  with parallel.axis_rules(mesh, parallel.DEFAULT_RULES):
    out = parallel.on_process_rows(fn, local)
  assert seen[0].spec[0] is not None  # the rows were sharded over the batch mesh axes
  assert isinstance(out['y'], np.ndarray)
  np.testing.assert_array_equal(out['y'], 2 * np.concatenate([local['x'], local['x']], 1))
  np.testing.assert_array_equal(out['n'], local['x'].sum(1))
  np.testing.assert_array_equal(parallel.on_process_rows(fn, local)['n'], local['x'].sum(1))
  assert parallel.host_value(jnp.ones(3)).tolist() == [1, 1, 1]
  assert parallel.gather_process_rows({'a': np.array([1, 2])})['a'].tolist() == [1, 2]
