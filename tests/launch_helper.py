"""Programs for the launcher tests, run as `python -m tests.launch_helper MODE ...` in each process.

sum      initialises jax.distributed like kuaijax.main, sums a global array whose rows each process
         gives (row r = r) and writes [process_count, device_count, local devices, sum] to
         $KJ_OUT/<process index>.json.
fail     process 1 exits with status 7 at once; the others write their pid to $KJ_PID_DIR and sleep.
params   loads the params of the checkpoint in $KJ_WORKDIR (the launcher test's LM stage folder)
         onto a mesh of all processes' devices ($KJ_MESH, e.g. 'fsdp=4,expert=2') and writes
         {path: sum of squares}, computed on the mesh, to $KJ_OUT/<process index>.json.
moe      the Top-P MoE layer of `moe_problem()` with its experts sharded over the 'expert' axis of
         all processes' devices (tokens exchanged by all-to-all between the processes): process 0
         writes y and the gradients (`moe_grads`) to $KJ_OUT/moe.npz.
"""

import json
import os
import sys
import time


def _fail():
  if os.environ['JAX_PROCESS_ID'] == '1':
    sys.exit(7)
  with open(os.path.join(os.environ['KJ_PID_DIR'], f'{os.getpid()}.pid'), 'w') as f:
    f.write(str(os.getpid()))
  time.sleep(120)


def _sum():
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from kuaijax import parallel

  parallel.maybe_initialize_distributed()
  mesh = parallel.make_mesh({'data': -1})
  local = jax.local_device_count()
  rows = np.arange(local, dtype=np.float32) + jax.process_index() * local
  global_rows = parallel.shard_batch({'x': rows}, mesh, parallel.DEFAULT_RULES)['x']
  total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(
    global_rows
  )
  with open(os.path.join(os.environ['KJ_OUT'], f'{jax.process_index()}.json'), 'w') as f:
    json.dump([jax.process_count(), jax.device_count(), local, float(total)], f)


def _params():
  import jax
  import jax.numpy as jnp

  from kuaijax import parallel
  from kuaijax.stages import roles
  from kuaijax.train.checkpoint import load_params
  from tests.launch_test import _config

  parallel.maybe_initialize_distributed()
  config = _config()
  mesh = dict(item.split('=') for item in os.environ['KJ_MESH'].split(','))
  config.parallel.mesh.update({'data': 1, 'fsdp': 1, 'tensor': 1, 'expert': 1})
  config.parallel.mesh.update({k: int(v) for k, v in mesh.items()})
  layout = roles.layout(config, 'policy')
  params, _ = load_params(os.environ['KJ_WORKDIR'], layout.abstract_params, layout.shardings)
  sums = parallel.host_value(jax.jit(lambda p: jax.tree.map(lambda x: jnp.sum(x * x), p))(params))
  flat = jax.tree_util.tree_flatten_with_path(sums)[0]
  with open(os.path.join(os.environ['KJ_OUT'], f'{jax.process_index()}.json'), 'w') as f:
    json.dump({jax.tree_util.keystr(k): float(v) for k, v in flat}, f)


MOE_SIZES = dict(tokens=32, d=8, d_ff=16, experts=4)


def moe_problem(seed: int = 0):
  """Numpy inputs of an MoE layer (x, router_w, w1, w3, w2) and a cotangent for its output, the
  same in every process."""
  import numpy as np

  t, d, f, e = (MOE_SIZES[k] for k in ('tokens', 'd', 'd_ff', 'experts'))
  rng = np.random.default_rng(seed)
  draw = lambda *shape, scale=0.3: (scale * rng.standard_normal(shape)).astype(np.float32)
  args = (draw(t, d, scale=1.0), draw(d, e, scale=0.2), draw(e, d, f), draw(e, d, f), draw(e, f, d))
  return args, draw(t, d, scale=1.0)


def moe_grads(mesh=None):
  """jit(value_and_grad) of sum(y * cotangent) + balance loss of the `moe_problem` layer with
  uncapped Top-P routing (1 or 2 of the 4 experts per token: empty slots too): returns (y, grads,
  the compiled program's text). mesh None: all experts on one device ('dense')."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from kuaijax.models import moe

  cfg = moe.MoEConfig(
    num_experts=MOE_SIZES['experts'],
    routing='top_p',
    dispatch='dense' if mesh is None else 'auto',
    gmm_implementation='ragged_dot',
  )
  args, cotangent = moe_problem()
  if mesh is not None:  # global arrays, replicated: every process gives the same values
    whole = NamedSharding(mesh, PartitionSpec())
    place = lambda a: jax.make_array_from_callback(a.shape, whole, lambda index: a[index])
    args, cotangent = jax.tree.map(place, (args, cotangent))

  def loss(args, cotangent):
    y, aux = moe.moe_ffn(*args, cfg, mesh=mesh)
    return jnp.sum(y * cotangent) + aux['balance_loss'], y

  compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(args, cotangent).compile()
  (_, y), grads = compiled(args, cotangent)
  return y, grads, compiled.as_text()


def _moe():
  import jax
  import numpy as np

  from kuaijax import parallel

  parallel.maybe_initialize_distributed()
  mesh = parallel.make_mesh({'expert': jax.device_count()})
  y, grads, text = moe_grads(mesh)
  y, grads = parallel.host_value((y, grads))
  if jax.process_index() == 0:
    arrays = {f'd{i}': g for i, g in enumerate(grads)}
    path = os.path.join(os.environ['KJ_OUT'], 'moe.npz')
    np.savez(path, y=y, all_to_all=np.asarray('all-to-all' in text), **arrays)


if __name__ == '__main__':
  {'fail': _fail, 'sum': _sum, 'params': _params, 'moe': _moe}[sys.argv[1]]()
