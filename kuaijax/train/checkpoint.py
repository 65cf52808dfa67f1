"""Orbax checkpoints of the train state, the grain iterator and a model signature.

A checkpoint step folder holds three items: `state` (params, optimizer state, step, ...), `data` (the
data iterator's state, see `DataStateHandler`) and `meta` (model config and parameter shapes). The
signature lets a resumed run refuse a workdir that belongs to a different model before anything is
restored or written; a checkpoint that cannot be read is reported by path and left in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used (corrupt, or written by a different model)."""


def param_signature(abstract_params) -> dict[str, list]:
  """{'path': [shape..., dtype]} of a parameter tree, for comparing models across runs."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  return {jax.tree_util.keystr(p): [*map(int, x.shape), str(x.dtype)] for p, x in flat}


def _first_differences(saved: Mapping, current: Mapping, limit: int = 3) -> list[str]:
  diffs = []
  for key in sorted(set(saved) | set(current)):
    if saved.get(key) != current.get(key):
      diffs.append(f'{key}: checkpoint {saved.get(key)} vs config {current.get(key)}')
  return diffs[:limit] + ([f'... {len(diffs) - limit} more'] if len(diffs) > limit else [])


class DataStateHandler:
  """Orbax handler for the training data iterator's position, as JSON files in the `data` item.

  An iterator that defines `checkpoint_states() -> {name: state}` (the files this process writes)
  and `restore_states(read)` (`read(name)` loads one) has state that does not depend on the
  process count: the LM data writes one file per data shard, in-memory data one shared position,
  so a checkpoint resumes on any process count the data allows. Other iterators write
  `process_<i>-of-<n>.json` (grain's own layout) and resume on the same process count only.
  """

  def save(self, directory, args):
    iterator = args.item
    if hasattr(iterator, 'checkpoint_states'):
      states = iterator.checkpoint_states()
    else:
      states = {_process_file(): iterator.get_state()}
    for name, state in states.items():
      (epath.Path(directory) / f'{name}.json').write_text(json.dumps(state))

  def restore(self, directory, args):
    iterator, directory = args.item, epath.Path(directory)

    def read(name):
      path = directory / f'{name}.json'
      if not path.exists():
        saved = sorted(p.name for p in directory.glob('*.json'))
        raise CheckpointError(
          f'no data-iterator state {path.name} in {directory} (it holds {saved}): the run that '
          'wrote it split its data differently (data.shards, or the process count for this '
          'data); resume with the data settings of that run. Nothing was changed.'
        )
      return json.loads(path.read_text())

    if hasattr(iterator, 'restore_states'):
      iterator.restore_states(read)
    else:
      iterator.set_state(read(_process_file()))
    return iterator

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    del directory

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f'{cls.__module__}.{cls.__qualname__}'


def _process_file() -> str:
  return f'process_{jax.process_index()}-of-{jax.process_count()}'


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: object


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: object


class Checkpointer:
  """CheckpointManager wrapper: keep-N, periodic async saves, safe restores."""

  def __init__(self, directory: str, *, keep: int, save_every: int, async_save: bool = True):
    if keep < 1 or save_every < 1:
      raise ValueError(
        f'train.keep_checkpoints={keep} and train.checkpoint_every={save_every} must be >= 1'
      )
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def maybe_save(self, step: int, state, data_iterator, meta: Mapping, *, force: bool = False):
    """Saves at multiples of `save_every` (or when forced); returns whether it saved."""
    if not force and step % self.save_every:
      return False
    if step in self._manager.all_steps():
      return False
    args = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(dict(meta))}
    if data_iterator is not None:
      args['data'] = DataSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def read_meta(self, step: int) -> dict:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        'meta'
      ]
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
      raise CheckpointError(self._unreadable(step, e)) from e

  def check_compatible(self, step: int, signature: Mapping) -> dict:
    """Raises CheckpointError when the checkpoint's parameters differ from `signature`."""
    meta = self.read_meta(step)
    saved = meta.get('param_signature')
    if saved != dict(signature):
      diffs = _first_differences(saved or {}, signature)
      raise CheckpointError(
        f'{self.directory}/{step} was written by a different model: '
        + '; '.join(diffs)
        + '. Nothing was overwritten: use another --workdir, or the config that wrote it.'
      )
    return meta

  def restore(self, step: int, abstract_state=None, data_iterator=None):
    """Restores `state` onto the shardings of `abstract_state` (and the iterator in place).

    With no `abstract_state` the state comes back as saved, on the host (integer dict keys such
    as layer indices come back as strings).
    """
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args['data'] = DataRestore(data_iterator)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**args))['state']
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(self._unreadable(step, e)) from e

  def restore_params(self, step: int, abstract_params):
    """Only the params, onto the shardings `abstract_params` carries (ShapeDtypeStructs).

    The target may be any mesh or process count: orbax reads each array's slices from the saved
    shards. Use a Checkpointer that has not saved in this process (the restore registers a
    different handler for the `state` item).
    """
    target = {'params': abstract_params}
    args = ocp.args.PyTreeRestore(
      target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True,
    )
    try:
      return self._manager.restore(step, args=ocp.args.Composite(state=args))['state']['params']
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(self._unreadable(step, e)) from e

  def _unreadable(self, step: int, error: Exception) -> str:
    return (
      f'checkpoint {self.directory}/{step} could not be read ({type(error).__name__}: '
      f'{str(error)[:300]}). It was left in place; delete that step folder to resume from an '
      'earlier step, or use another --workdir.'
    )

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def load_params(path: str, abstract_params, shardings):
  """Params from the latest checkpoint under `path` (a workdir or its checkpoints folder).

  Used for `config.init_from`: shapes must match the current model's; optimizer state is ignored.
  The params land on `shardings`, whatever mesh or process count wrote the checkpoint.
  """
  directory = (
    path
    if os.path.basename(path.rstrip('/')) == 'checkpoints'
    else os.path.join(path, 'checkpoints')
  )
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'init_from={path!r}: no checkpoints folder at {directory}')
  ckpt = Checkpointer(directory, keep=1_000_000, save_every=1, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f'init_from={path!r}: {directory} holds no finished checkpoint')
  ckpt.check_compatible(step, param_signature(abstract_params))
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings
  )
  params = ckpt.restore_params(step, target)
  ckpt.close()
  return params, step


def save_params(path: str, params, step: int) -> None:
  """Writes params alone as a checkpoint under `path`/checkpoints, for `load_params` (e.g. a LoRA
  stage's merged model)."""
  ckpt = Checkpointer(os.path.join(path, 'checkpoints'), keep=1, save_every=1, async_save=False)
  ckpt.maybe_save(step, {'params': params}, None, {'param_signature': param_signature(params)})
  ckpt.close()
