"""Programs for the launcher tests, run as `python -m tests.launch_helper MODE ...` in each process.

sum      initialises jax.distributed like kuaijax.main, sums a global array whose rows each process
         gives (row r = r) and writes [process_count, device_count, local devices, sum] to
         $KJ_OUT/<process index>.json.
fail     process 1 exits with status 7 at once; the others write their pid to $KJ_PID_DIR and sleep.
params   loads the params of the checkpoint in $KJ_WORKDIR (the launcher test's LM stage folder)
         onto a mesh of all processes' devices ($KJ_MESH, e.g. 'fsdp=4,expert=2') and writes
         {path: sum of squares}, computed on the mesh, to $KJ_OUT/<process index>.json.
main     `kuaijax.main` where every process exits with status 3 right after the checkpoint of step
         $KJ_CRASH_STEP is written (a run killed mid-way), first writing the train-split example
         indices it has read into $KJ_READ_LOG/<process index>.json.
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


class _Recorded:
  """A data source that logs the indices read through it."""

  def __init__(self, source, log):
    self._source, self._log = source, log

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    self._log.append(int(index))
    return self._source[index]


def _main(argv):
  import jax
  from absl import app
  from jax.experimental import multihost_utils

  from kuaijax import main as kj_main
  from kuaijax.data import sources
  from kuaijax.train import checkpoint

  reads = []

  def write_reads():
    path = os.path.join(os.environ['KJ_READ_LOG'], f'{jax.process_index()}.json')
    with open(path, 'w') as f:
      json.dump(reads, f)

  get_source = sources.get_data_source

  def recorded_source(name, *, split, **kwargs):
    source = get_source(name, split=split, **kwargs)
    return _Recorded(source, reads) if split == 'train' else source

  sources.get_data_source = recorded_source
  crash_step = int(os.environ['KJ_CRASH_STEP'])
  maybe_save = checkpoint.Checkpointer.maybe_save

  def crashing_save(self, step, *args, **kwargs):
    saved = maybe_save(self, step, *args, **kwargs)
    if saved and step == crash_step:
      self.wait()
      multihost_utils.sync_global_devices('kuaijax_test_crash')
      write_reads()
      os._exit(3)
    return saved

  checkpoint.Checkpointer.maybe_save = crashing_save
  app.run(kj_main.main, argv=[sys.argv[0], *argv])


if __name__ == '__main__':
  mode, rest = sys.argv[1], sys.argv[2:]
  {'fail': _fail, 'sum': _sum, 'params': _params}.get(mode, lambda: _main(rest))()
