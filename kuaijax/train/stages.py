"""Stage types of the pipeline, registered by name, and the `Stage` handle each one receives.

A stage type is a function `fn(stage: Stage) -> dict` (its summary, kept in `stage.json`). It reads
its own config block (`stage.block`), its inputs through `stage.records(ref)` (a previous stage's
data set, or `'task:<split>'` for the task's records) and `stage.load_model(ref)` (a previous
stage's parameters, or a checkpoint path), and writes its outputs into its own folder
(`stage.dir`): a data set with `stage.write_data(records)` (jsonl, atomic), parameters through the
trainer's checkpoints. Randomness comes from `stage.seed(purpose)`, derived from the stage's name.

Built in here: 'sample' (a policy's samples of the task's prompts, with per-token log-probs and
correctness) and 'params' (parameters from an existing checkpoint, e.g. an SFT run done elsewhere).
'train' lives in `kuaijax.train.pipeline`; methods register their own (e.g. 'pairs', 'minimal_edit').
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import jax
from flax import nnx

from kuaijax import parallel
from kuaijax.data import records as records_lib
from kuaijax.data import tasks
from kuaijax.evals.task_accuracy import sample_completions
from kuaijax.registry import Registry
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train import lm_task
from kuaijax.train.trainer import param_layout

TASK_PREFIX = 'task:'
DATA_FILE = 'data.jsonl'
STAGE_FILE = 'stage.json'

# name -> fn(stage) -> summary dict. `@register_stage_type('teacher') def teacher(stage): ...`
STAGE_TYPES = Registry('stage type')
register_stage_type = STAGE_TYPES.register
get_stage_type = STAGE_TYPES.lookup


def stage_seed(base: int, name: str) -> int:
  """A seed for `name` (a stage, or 'stage/purpose'): base + crc32(name), in [0, 2**31)."""
  return (int(base) + zlib.crc32(name.encode())) % (2**31)


@dataclasses.dataclass
class Stage:
  """One stage's view of the pipeline (see the module docstring).

  `pipeline` is the run's `kuaijax.train.pipeline.Pipeline` (config, workdir, tokenizer, task,
  evaluators); `done` maps the names of the stages finished so far to their `stage.json`.
  """

  name: str
  block: object  # the stage's ConfigDict
  pipeline: object
  done: dict
  outputs: dict = dataclasses.field(default_factory=dict)  # merged into stage.json

  @property
  def config(self):
    return self.pipeline.config

  @property
  def workdir(self) -> str:
    return self.pipeline.workdir

  @property
  def tokenizer(self):
    return self.pipeline.tokenizer

  @property
  def task(self) -> tasks.Task | None:
    return self.pipeline.task

  @property
  def dir(self) -> str:
    return os.path.join(self.workdir, self.name)

  def seed(self, purpose: str = '') -> int:
    return stage_seed(self.config.seed, f'{self.name}/{purpose}' if purpose else self.name)

  def _finished(self, ref: str, what: str) -> dict:
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
    info = self._finished(ref, 'data')
    if 'data' not in info:
      raise ValueError(f'stage {self.name}: stage {ref!r} wrote no data set')
    return records_lib.read_records(os.path.join(self.workdir, ref, info['data']))

  def write_data(self, records, filename: str = DATA_FILE) -> int:
    """Writes this stage's data set (what `records(<this stage>)` returns later).

    Every process computes the same records; process 0 writes them, the others wait for it.
    """
    self.outputs['data'] = filename
    records = list(records)
    if jax.process_index() == 0:
      records_lib.write_records(os.path.join(self.dir, filename), records)
    parallel.sync(f'kuaijax_stage_data_{self.name}')
    return len(records)

  def params_path(self, ref: str) -> str:
    """A stage name -> the checkpoints of its parameters; anything else is a checkpoint path."""
    if ref in self.config.stage:
      info = self._finished(ref, 'params source')
      if 'params' not in info:
        raise ValueError(f'stage {self.name}: stage {ref!r} has no parameters')
      return os.path.join(self.workdir, info['params'])  # relative: inside the workdir
    return ref

  def set_params(self, path: str) -> None:
    """Records where this stage's parameters are (a checkpoint path, or this stage's folder)."""
    own = path == self.dir
    self.outputs['params'] = os.path.relpath(path, self.workdir) if own else os.path.abspath(path)

  def layout(self):
    return param_layout(self.config, lm_task.model_factory(self.config.model))

  def load_model(self, ref: str):
    """(graphdef, params) of a stage's (or checkpoint path's) parameters, placed on the mesh."""
    layout = self.layout()
    params, _ = ckpt_lib.load_params(
      self.params_path(ref), layout.abstract_params, layout.shardings
    )
    return layout.graphdef, params

  def axis_rules(self):
    layout = self.layout()
    return parallel.axis_rules(layout.mesh, layout.rules)


def cycle(records: list[dict], offset: int, limit: int) -> list[dict]:
  """`limit` records from `offset` (cycling; 0 = all from offset)."""
  n = len(records)
  if not n:
    raise ValueError('no records to take from')
  count = min(limit, n) if limit else n
  return [records[(offset + i) % n] for i in range(count)]


@register_stage_type('sample')
def sample_stage(stage: Stage) -> dict:
  """`num_samples` completions per prompt from `policy` at `temperature` (top_p 1.0 = off).

  Options: policy, data, limit, offset, num_samples, temperature, top_p, batch_size. Writes one
  record per sample: the prompt record's fields, `gold` (its completion), `index` (prompt number),
  `completion` (text), `completion_tokens`, `logprobs` (the sampling model's, temperature 1) and
  `correct` (the task's check).
  """
  b, dc = stage.block, stage.config.data
  prompts = cycle(stage.records(b.data), b.offset, b.limit)
  graphdef, params = stage.load_model(b.policy)
  with stage.axis_rules():
    samples = sample_completions(
      nnx.merge(graphdef, params),
      stage.tokenizer,
      [r['prompt'] for r in prompts],
      num_samples=b.num_samples,
      seed=stage.seed(),
      temperature=b.temperature,
      top_p=b.top_p if b.top_p < 1.0 else None,
      max_new_tokens=dc.max_new_tokens,
      prompt_len=dc.prompt_len,
      batch_size=b.batch_size,
    )
  out = []
  for s in samples:
    source = prompts[s.index]
    out.append(
      {
        **source,
        'gold': source.get('completion', ''),
        'index': s.index,
        'completion': s.text,
        'completion_tokens': s.tokens,
        'logprobs': s.logprobs,
        'correct': bool(stage.task.is_correct(s.text, source)),
      }
    )
  stage.write_data(out)
  correct = sum(r['correct'] for r in out)
  return {'prompts': len(prompts), 'samples': len(out), 'sample_accuracy': correct / len(out)}


@register_stage_type('params')
def params_stage(stage: Stage) -> dict:
  """Parameters from `path` (a workdir or checkpoints folder): later stages start from them."""
  if not stage.block.path:
    raise ValueError(f'stage {stage.name}: type params needs path=<workdir or checkpoints folder>')
  stage.load_model(stage.block.path)  # fails early (and clearly) on a missing or wrong checkpoint
  stage.set_params(stage.block.path)
  return {'path': stage.block.path}
