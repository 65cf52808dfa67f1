"""Meshes, logical axis rules and batch sharding.

Parameters and activations carry logical axis names (batch, length, embed, mlp, heads, kv_heads,
kv, vocab, expert, norm). A config maps those names to mesh axes (data, fsdp, tensor, expert). The
same model code therefore runs on one device, on 8 simulated CPU devices and on a pod; only the config
changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')

# Logical name -> mesh axes. A mesh axis already used by an earlier dimension of the same array
# is skipped, so activations ('batch', 'length', 'embed') shard their batch over (data, fsdp) while
# parameters ('embed', 'mlp') shard embed over fsdp.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
  ('batch', ('data', 'fsdp', 'expert')),
  ('length', ()),
  ('embed', ('fsdp',)),
  ('mlp', ('tensor',)),
  ('heads', ('tensor',)),
  ('kv_heads', ('tensor',)),
  ('kv', ()),
  ('vocab', ('tensor',)),
  ('expert', ('expert',)),
  ('norm', ()),
  ('layers', ()),
)

_CURRENT: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
  'kuaijax_mesh_rules', default=None
)


INIT_TIMEOUT_ENV = 'KUAIJAX_INIT_TIMEOUT'  # seconds to reach the coordinator (default 300)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Polls `host:port` until it accepts a TCP connection; a clear error after `timeout_s`.

  `jax.distributed.initialize` aborts the whole process (no Python exception) when a worker cannot
  register in time; checking the coordinator first turns that into an error naming the address.
  """
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise TimeoutError(
          f'JAX coordinator {address} was unreachable for {timeout_s:g} s ({e}); is process 0 '
          f'running, and is the address right? ({INIT_TIMEOUT_ENV} sets the wait)'
        ) from None
      time.sleep(0.2)


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when the environment describes a multi-process job.

  Cloud TPU pods (several worker hostnames), SLURM / Open MPI launches with more than one task, or
  an explicit `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` where no
  cluster environment gives them, as `kuaijax.launch` sets them) trigger it; a single process does
  nothing. Workers other than process 0 first wait for a given coordinator address for at most
  $KUAIJAX_INIT_TIMEOUT seconds, then fail with a clear error instead of hanging.
  """
  if jax.distributed.is_initialized():
    return
  tasks = int(os.environ.get('SLURM_NTASKS', os.environ.get('OMPI_COMM_WORLD_SIZE', '1')))
  tpu_pod = ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')
  address = os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  if not (tpu_pod or tasks > 1 or address):
    return
  timeout = int(os.environ.get(INIT_TIMEOUT_ENV, '300'))
  kwargs = {}
  given = [os.environ.get(k) for k in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')]
  if any(given):
    if not all(given):
      raise ValueError('set both JAX_NUM_PROCESSES and JAX_PROCESS_ID, or neither')
    kwargs = dict(num_processes=int(given[0]), process_id=int(given[1]))
  if address and kwargs.get('process_id', 0) != 0:
    wait_for_coordinator(address, timeout)
  jax.distributed.initialize(initialization_timeout=timeout, **kwargs)
  logging.info(
    'jax.distributed initialised: process %d of %d', jax.process_index(), jax.process_count()
  )


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves a {axis: size} mapping where one size may be -1 ("the rest of the devices")."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'parallel.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}')
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(f'parallel.mesh: at most one axis may be -1, got {rest}')
  bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
  if bad:
    raise ValueError(f'parallel.mesh: axis sizes must be positive or -1, got {bad}')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if num_devices % fixed:
    raise ValueError(
      f'parallel.mesh {sizes} needs a multiple of {fixed} devices, but {num_devices} are present'
    )
  if rest:
    sizes[rest[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
      f'parallel.mesh {sizes} uses {math.prod(sizes.values())} devices, '
      f'but {num_devices} are present'
    )
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a Mesh with axes (data, fsdp, tensor, expert) from the config's sizes."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (AssertionError, NotImplementedError, ValueError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def mesh_from_config(parallel_config) -> Mesh:
  """The mesh of a `parallel` config section over its first `num_devices` devices (0 = all)."""
  devices = jax.devices()
  n = int(parallel_config.get('num_devices', 0) or 0)
  if n < 0 or n > len(devices):
    raise ValueError(f'parallel.num_devices={n} but {len(devices)} devices are present')
  return make_mesh(parallel_config.mesh, devices[:n] if n else devices)


def rules_dict(rules) -> dict[str, tuple[str, ...]]:
  """Normalises rules given as pairs or a mapping to {logical: (mesh axes...)}."""
  items = rules.items() if hasattr(rules, 'items') else rules
  out = {}
  for name, axes in items:
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(
        f'parallel.rules[{name!r}] names unknown mesh axes {bad}; allowed {MESH_AXES}'
      )
    out[str(name)] = tuple(axes)
  return out


def logical_to_spec(
  logical_axes: Sequence[str | None],
  rules: Mapping[str, tuple[str, ...]],
  mesh: Mesh | None = None,
  shape: Sequence[int] | None = None,
) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec.

  Mesh axes of size 1 are dropped; so are axes already used by an earlier dimension and, when
  `shape` is given, axes whose size does not divide the dimension (that dimension is replicated).
  """
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f'logical axis {name!r} has no rule; known: {sorted(rules)}')
    axes = []
    size = 1
    for axis in rules[name]:
      if axis in used or (mesh is not None and mesh.shape[axis] == 1):
        continue
      axis_size = mesh.shape[axis] if mesh is not None else 1
      if shape is not None and shape[dim] % (size * axis_size):
        continue
      axes.append(axis)
      size *= axis_size
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return PartitionSpec(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_axes_tree(state: nnx.State) -> dict:
  """Pure dict {path: logical axes} of an NNX state; every parameter must carry `logical_axes`."""

  def axes(path, variable):
    names = variable.get_metadata().get('logical_axes')
    if names is None or len(names) != variable.get_value().ndim:
      raise ValueError(
        f'parameter {jax.tree_util.keystr(path)} has logical_axes={names} '
        f'for shape {variable.get_value().shape}'
      )
    return tuple(names)

  return nnx.to_pure_dict(jax.tree.map_with_path(axes, state, is_leaf=_is_variable))


def state_shardings(abstract_params, axes_tree, mesh: Mesh, rules) -> dict:
  """NamedShardings for a pure-dict parameter tree from its logical axes."""
  rules = rules_dict(rules)
  return jax.tree.map(
    lambda leaf, names: NamedSharding(mesh, logical_to_spec(names, rules, mesh, leaf.shape)),
    abstract_params,
    axes_tree,
    is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str | None) for n in x),
  )


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules):
  """Makes `constrain` shard activations on `mesh` with `rules` inside this context."""
  token = _CURRENT.set((mesh, rules_dict(rules)))
  try:
    yield
  finally:
    _CURRENT.reset(token)


def current_axis_rules() -> tuple[Mesh, dict] | None:
  """The (mesh, rules dict) of the innermost active `axis_rules` context, or None outside one."""
  return _CURRENT.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside `axis_rules`."""
  current = _CURRENT.get()
  if current is None:
    return x
  mesh, rules = current
  spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules, ndim: int, batch_dim: int = 0) -> NamedSharding:
  """Sharding of an input array whose dimension `batch_dim` is the batch; the rest replicated."""
  names = [None] * ndim
  names[batch_dim] = 'batch'
  return NamedSharding(mesh, logical_to_spec(names, rules_dict(rules), mesh))


def batch_mesh_size(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split (the product of its mesh axes)."""
  axes = rules_dict(rules).get('batch', ())
  return math.prod(mesh.shape[a] for a in axes)


def shard_batch(
  batch: Mapping[str, np.ndarray], mesh: Mesh, rules, batch_dim: int = 0
) -> dict[str, jax.Array]:
  """Turns this process's slice of a global batch into global jax.Arrays.

  Each process passes its local rows; `jax.make_array_from_process_local_data` stitches them into
  one array sharded over the batch mesh axes, on one host or many.
  """
  return {
    k: jax.make_array_from_process_local_data(
      batch_sharding(mesh, rules, np.ndim(v), batch_dim), np.asarray(v)
    )
    for k, v in batch.items()
  }


def process_rows(tree, mesh: Mesh, rules) -> dict:
  """This process's rows of global arrays split over their leading (batch) axis, as numpy.

  The inverse of `shard_batch`: `process_rows(shard_batch(local, mesh, rules), ...) == local` on
  every process. Arrays are first laid out as batches (`batch_sharding`), so outputs sharded any
  other way (e.g. logits over the vocabulary) come back whole per row.
  """

  def rows(x):
    if x.is_fully_addressable:
      return np.asarray(x)
    x = jax.device_put(x, batch_sharding(mesh, rules, x.ndim))
    shards = {s.index[0].indices(x.shape[0])[0]: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])

  return jax.tree.map(rows, tree)


def host_value(tree):
  """`jax.device_get`, also for arrays that span processes (gathered from all of them first).

  Every process must call it with the same arrays (a collective when the job has several).
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)

  def whole(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(whole, tree)


def gather_process_rows(tree) -> dict:
  """The concatenation, in process order, of every process's host arrays (row-wise); on one
  process the arrays themselves. A collective: every process calls it with equally shaped arrays."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(
    lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True)), tree
  )


def on_process_rows(fn, local: Mapping[str, np.ndarray]):
  """`fn(batch)` on the global batch that every process's `local` rows make up; each process gets
  its own rows of the outputs back, as numpy (outside `axis_rules`, `fn` runs on `local` itself).

  This is how host-side code (rollouts, scoring) runs a model on per-process data in a multi-
  process job: the work is spread over the mesh, and no process sees another's rows.
  """
  current = current_axis_rules()
  if current is None:
    return jax.tree.map(np.asarray, jax.device_get(fn(dict(local))))
  mesh, rules = current
  return process_rows(fn(shard_batch(local, mesh, rules)), mesh, rules)


def this_process() -> dict[str, int]:
  """{'process_index', 'process_count'} of this process: the keyword arguments data sets take."""
  return {'process_index': jax.process_index(), 'process_count': jax.process_count()}


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to wait for on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
