"""Stage types, registered by name with the fields that name other stages, and the `Stage` handle.

A stage type is a function `fn(stage: Stage) -> dict` (its summary, kept in `stage.json`),
registered with `@register_stage_type(name, refs=(...), seeded=True)`:
  refs    the block fields that may name another stage (e.g. 'data', 'policy', 'init_from'); the
          runner schedules a stage after the stages they name and knows nothing else about types.
          A ref that is not a stage name is something else: 'task:<split>' (the task's records),
          a checkpoint path, '' (none), or a word the type gives its own meaning ('program').
  seeded  False for a type whose output does not depend on the pipeline seed (a program teacher,
          an imported checkpoint): when every stage it refers to is seed-free too, it runs once and
          every seed shares it.
A stage reads its own config block (`stage.block`), its inputs through `stage.records(ref)` and
`stage.load_model(ref)` (a stage's parameters, or a checkpoint path, as the model role it was
trained as) and writes its outputs into `stage.dir`: a data set with `stage.write_data(records)`,
parameters through the trainer's checkpoints (`stage.set_params(path, role)`). Randomness comes from
`stage.seed(purpose)`: the pipeline seed plus a hash of the stage's name and the purpose.

Types are found by name without a central list: a name that is not registered yet imports the
modules of `kuaijax.stages` (built-in types) or, for a dotted name 'mylab.stages.score', the module
'mylab.stages' (whose `@register_stage_type('mylab.stages.score')` registers it).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable

import jax

from kuaijax import parallel
from kuaijax.data import records as records_lib
from kuaijax.data import tasks
from kuaijax.registry import Registry
from kuaijax.stages import roles

TASK_PREFIX = 'task:'
DATA_FILE = 'data.jsonl'
STAGE_FILE = 'stage.json'
DEFAULT_ROLE = 'policy'


@dataclasses.dataclass(frozen=True)
class StageType:
  """A registered stage type: its function, the block fields naming other stages, seededness."""

  name: str
  fn: Callable[[Stage], dict]
  refs: tuple[str, ...]
  seeded: bool


STAGE_TYPES = Registry('stage type', package='kuaijax.stages')


def register_stage_type(name: str, *, refs: tuple[str, ...] = (), seeded: bool = True):
  """`@register_stage_type('teacher', refs=('data', 'teacher'))` registers `fn(stage) -> dict`."""
  add = STAGE_TYPES.register(name)

  def register(fn):
    add(StageType(name, fn, tuple(refs), bool(seeded)))
    return fn

  return register


def get_stage_type(name: str) -> StageType:
  return STAGE_TYPES.lookup(name)


def stage_seed(base: int, name: str) -> int:
  """A seed for `name` (a stage, or 'stage/purpose'): base + crc32(name), in [0, 2**31)."""
  return (int(base) + zlib.crc32(name.encode())) % (2**31)


@dataclasses.dataclass
class Stage:
  """One stage's view of the pipeline (see the module docstring).

  `pipeline` is the run's `kuaijax.stages.runner.Pipeline` (config, tokenizer, task, evaluators);
  `dir` is this stage's folder; `seed` the pipeline seed of this run (None for a seed-free stage);
  `done` maps the stages finished so far to their `stage.json` content, each with the absolute
  folder it lives in under the key 'dir'.
  """

  name: str
  block: object  # the stage's ConfigDict
  pipeline: object
  dir: str
  pipeline_seed: int | None
  done: dict
  outputs: dict = dataclasses.field(default_factory=dict)  # merged into stage.json

  @property
  def config(self):
    return self.pipeline.config

  @property
  def tokenizer(self):
    return self.pipeline.tokenizer

  @property
  def task(self) -> tasks.Task | None:
    return self.pipeline.task

  @property
  def role(self) -> str:
    """The model role this stage trains or uses by default (block field `model`)."""
    return self.block.get('model', DEFAULT_ROLE) or DEFAULT_ROLE

  def seed(self, purpose: str = '') -> int:
    base = 0 if self.pipeline_seed is None else self.pipeline_seed
    return stage_seed(base, f'{self.name}/{purpose}' if purpose else self.name)

  def finished(self, ref: str, what: str) -> dict:
    """The info (stage.json + 'dir') of the finished stage `ref`; `what` names the use in the
    error when it is not one."""
    if ref not in self.done:
      raise ValueError(f'stage {self.name}: {what} {ref!r} is not a finished stage of this run')
    return self.done[ref]

  def records(self, ref: str) -> list[dict]:
    """'task:<split>' -> the task's records (filtered by config.data.levels / limit); a stage name
    -> the data set that stage wrote."""
    if ref.startswith(TASK_PREFIX):
      if self.task is None:
        raise ValueError(f'stage {self.name}: data={ref!r} but config.data.task is empty')
      dc = self.config.data
      return self.task.load(
        ref.removeprefix(TASK_PREFIX), data_dir=dc.data_dir, limit=dc.limit, levels=dc.levels
      )
    info = self.finished(ref, 'data')
    if 'data' not in info:
      raise ValueError(f'stage {self.name}: stage {ref!r} wrote no data set')
    return data_of(info)

  def write_data(self, records, filename: str = DATA_FILE) -> int:
    """Writes this stage's data set (what `records(<this stage>)` returns later).

    Every process computes the same records; process 0 writes them, the others wait for it.
    """
    self.outputs['data'] = filename
    records = list(records)
    if jax.process_index() == 0:
      records_lib.write_records(os.path.join(self.dir, filename), records)
    parallel.sync(f'kuaijax_stage_data_{self.dir}')
    return len(records)

  def params_source(self, ref: str, role: str | None = None) -> roles.ParamsSource:
    """Where the parameters named by `ref` are: a finished stage's (as the role it recorded), or
    a checkpoint path (as `role`, default this stage's)."""
    if ref in self.config.stage:
      info = self.finished(ref, 'params source')
      if 'params' not in info:
        raise ValueError(f'stage {self.name}: stage {ref!r} has no parameters')
      return params_of(info)
    return roles.ParamsSource(ref, role or self.role, 'kuaijax')

  def own_params(self) -> roles.ParamsSource:
    """This stage's parameters, as `set_params` recorded them."""
    return params_of({**self.outputs, 'dir': self.dir})

  def set_params(self, path: str, role: str | None = None, *, params_format='kuaijax') -> None:
    """Records this stage's parameters: a checkpoint path (this stage's folder or one inside it is
    kept relative) holding the model role `role` (default this stage's), or a Hugging Face folder
    (`params_format='hf'`)."""
    role = role or self.role
    roles.check_role(self.config, role, f'stage {self.name}')
    path, here = os.path.abspath(path), os.path.abspath(self.dir)
    inside = params_format == 'kuaijax' and os.path.commonpath([path, here]) == here
    path = os.path.relpath(path, here) if inside else path
    self.outputs.update(params=path, model=role, params_format=params_format)

  def load_model(self, ref: str, role: str | None = None):
    """(graphdef, params) of a stage's (or checkpoint path's) parameters, placed on the mesh."""
    return roles.load(self.config, self.params_source(ref, role))

  def axis_rules(self):
    return parallel.axis_rules(*self.pipeline.mesh_and_rules())


def params_of(info: dict) -> roles.ParamsSource:
  """The parameters a stage recorded (`info`: its stage.json content plus 'dir', its folder)."""
  path, params_format = info['params'], info.get('params_format', 'kuaijax')
  if params_format == 'kuaijax':
    path = os.path.join(info['dir'], path)  # relative paths are relative to that stage's folder
  return roles.ParamsSource(path, info.get('model', DEFAULT_ROLE), params_format)


def data_of(info: dict) -> list[dict]:
  """The data set a stage wrote (`info`: its stage.json content plus 'dir', its folder)."""
  return records_lib.read_records(os.path.join(info['dir'], info['data']))


def cycle(records: list[dict], offset: int, limit: int) -> list[dict]:
  """`limit` records from `offset` (cycling; 0 = all from offset)."""
  n = len(records)
  if not n:
    raise ValueError('no records to take from')
  count = min(limit, n) if limit else n
  return [records[(offset + i) % n] for i in range(count)]
