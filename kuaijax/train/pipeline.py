"""The stage pipeline: `config.stages` runs named stages in order, each in its own folder, resumably.

Config:
  config.stages        'sft,samples,dpo' (',' or '+'): the stages to run, in order; the stages they
                       depend on (through the fields in `DEPENDENCY_FIELDS`) are added first.
  config.stage.<name>  one block per stage: `type` ('train', 'sample', 'params' or any registered
                       with `kuaijax.train.stages.register_stage_type`) and the type's options.
  config.seed          base seed; each stage's seeds are derived from its name (`stage_seed`).
  config.evals         evaluators by name (`kuaijax.evals.registry`), run on every stage that
                       produces parameters; results in that stage's `stage.json`.

A 'train' stage: `method` (a name in `kuaijax.methods.METHODS`), `data` ('task:<split>' or a stage
name), `init_from` (a stage name or checkpoint path; '' = from scratch), `reference` (a stage name
or path, for methods that need one), `options` (the method's keyword options), `loss` (forwarded to
its loss function), `train` / `optimizer` overrides of the shared sections, and optionally
`evaluate=False` (a model that is not a policy, e.g. a reward model, skips `config.evals`).

Each stage works in `<workdir>/<name>/` and, when it finishes, writes `stage.json` (its summary,
evaluation, the data set or parameters it produced). Re-running the same command skips finished
stages untouched, resumes a killed training stage from its last checkpoint (the trainer restores
params, optimizer, step and data iterator) and redoes an unfinished non-training stage (data sets
are written atomically).
"""

from __future__ import annotations

import copy
import json
import os
import time

import jax
from absl import logging

from kuaijax import parallel
from kuaijax.data import sequences, tasks, tokenizers
from kuaijax.evals import registry as eval_registry
from kuaijax.methods import get_method
from kuaijax.methods.base import MethodContext
from kuaijax.train import lm_task
from kuaijax.train.stages import STAGE_FILE, Stage, get_stage_type, register_stage_type
from kuaijax.train.trainer import check_batch_config, param_layout, train

# Block fields that may name another stage (RLMEC's stages add teacher / model / compare / auc_data).
DEPENDENCY_FIELDS = (
  'init_from',
  'reference',
  'policy',
  'data',
  'teacher',
  'model',
  'compare',
  'auc_data',
)


def parse_stage_list(text: str) -> list[str]:
  return [s.strip() for s in text.replace('+', ',').split(',') if s.strip()]


def stage_order(config) -> list[str]:
  """`config.stages` with their dependencies first (each once), validated."""
  requested = parse_stage_list(config.stages)
  if not requested:
    raise ValueError('config.stages is empty')
  order, visiting = [], []

  def visit(name, needed_by):
    if name not in config.stage:
      where = f' (needed by {needed_by})' if needed_by else ''
      raise ValueError(
        f'stage {name!r}{where} has no block; config.stage has {sorted(config.stage)}'
      )
    if name in order:
      return
    if name in visiting:
      raise ValueError(f'stages depend on each other in a cycle: {" -> ".join([*visiting, name])}')
    visiting.append(name)
    block = config.stage[name]
    for field in DEPENDENCY_FIELDS:
      ref = block.get(field, '')
      if isinstance(ref, str) and ref in config.stage:
        visit(ref, name)
    visiting.pop()
    order.append(name)

  for name in requested:
    visit(name, '')
  return order


def stage_train_config(config, block, *, seed: int, init_from: str):
  """The trainer's config for a training stage: shared sections + the block's overrides."""
  out = copy.deepcopy(config)
  out.unlock()
  out.train.update(block.train.to_dict())
  out.optimizer.update(block.optimizer.to_dict())
  out.train.seed = seed
  out.init_from = init_from
  out.lock()
  return out


class Pipeline:
  """Shared by the stages of one run: tokenizer, task, evaluators (built once, on first use)."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    dc = config.data
    # data.tokenizer='hf' reads tokenizer.json from the run's init_from_hf folder.
    self.tokenizer = tokenizers.get_tokenizer(
      dc.tokenizer,
      spm_model_path=dc.spm_model_path or None,
      hf_path=config.get('init_from_hf') or None,
    )
    if self.tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(
        f'model.vocab_size={config.model.vocab_size} is smaller than the tokenizer vocabulary '
        f'({self.tokenizer.vocab_size})'
      )
    self.task = tasks.get_task(dc.task) if dc.task else None
    self._evaluators = None

  def evaluators(self):
    if self._evaluators is None:
      layout = param_layout(self.config, lm_task.model_factory(self.config.model))
      ctx = eval_registry.EvalContext(
        tokenizer=self.tokenizer,
        task=self.task,
        data=self.config.data,
        mesh=layout.mesh,
        rules=layout.rules,
      )
      self._evaluators = eval_registry.build_evaluators(self.config.evals, ctx)
    return self._evaluators

  def method_context(self) -> MethodContext:
    dc = self.config.data
    return MethodContext(
      tokenizer=self.tokenizer,
      task=self.task,
      seq_len=dc.seq_len,
      prompt_len=dc.prompt_len,
      max_new_tokens=dc.max_new_tokens,
      pack=dc.pack,
    )


@register_stage_type('train')
def train_stage(stage: Stage) -> dict:
  """Trains `block.method` on `block.data` (see the module docstring)."""
  b, pipe = stage.block, stage.pipeline
  method = get_method(b.method)(pipe.method_context(), loss=b.loss.to_dict(), **b.options.to_dict())
  examples, stats = method.examples(stage.records(b.data))
  frozen = None
  if method.needs_reference:
    if not b.reference:
      raise ValueError(f'stage {stage.name}: method {b.method!r} needs reference=<stage or path>')
    graphdef, ref_params = stage.load_model(b.reference)
    with stage.axis_rules():
      examples = method.prepare(examples, graphdef, ref_params)
    frozen = ref_params if method.frozen_reference else None
  init_from = stage.params_path(b.init_from) if b.init_from else ''
  cfg = stage_train_config(stage.config, b, seed=stage.seed('train'), init_from=init_from)
  layout = param_layout(cfg, lm_task.model_factory(cfg.model))
  micro = check_batch_config(cfg.train, layout.mesh, layout.rules)
  dataset = sequences.in_memory_dataset(
    examples, batch_size=micro, seed=stage.seed('data'), **parallel.this_process()
  )
  evaluators = pipe.evaluators()
  result = train(
    cfg,
    stage.dir,
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=method.loss_fn,
    train_dataset=dataset,
    evaluate=evaluators.evaluate if evaluators.evaluators and b.get('evaluate', True) else None,
    frozen=frozen,
    prepare_batch=method.rollout,
    count_tokens=method.count_tokens,
  )
  stage.set_params(stage.dir)
  stage.outputs['eval'] = result.last_eval
  last = result.history[-1] if result.history else {}
  return {**stats, 'steps': result.step, 'last_train_metrics': last}


def _write_json(path: str, value: dict) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def run_pipeline(config, workdir: str) -> dict[str, dict]:
  """Runs (or resumes) the configured stages; returns name -> that stage's `stage.json` content."""
  order = stage_order(config)
  pipe = Pipeline(config, workdir)
  done: dict[str, dict] = {}
  for name in order:
    block = config.stage[name]
    path = os.path.join(workdir, name, STAGE_FILE)
    if os.path.exists(path):
      with open(path) as f:
        done[name] = json.load(f)
      if done[name].get('block') != json.loads(json.dumps(block.to_dict())):
        logging.warning('stage %s finished earlier with a different config; kept as it is', name)
      continue
    start = time.time()
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
    stage = Stage(name, block, pipe, dict(done))
    summary = get_stage_type(block.type)(stage)
    info = {'name': name, 'type': block.type, 'summary': summary, **stage.outputs}
    if 'params' in info and 'eval' not in info and pipe.evaluators().evaluators:
      with stage.axis_rules():
        info['eval'] = pipe.evaluators().evaluate(
          *stage.load_model(os.path.join(workdir, info['params']))
        )
    info.update(block=block.to_dict(), wall_s=time.time() - start)
    if jax.process_index() == 0:
      _write_json(path, info)
    parallel.sync(f'kuaijax_stage_done_{name}')  # every process sees the same finished stages
    done[name] = info
  return done
