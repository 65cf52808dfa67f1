"""The stage pipeline: `config.stages` runs named stages in order, per seed, each in its own folder,
resumably. It knows no method or paper: stage types declare which block fields name other stages.

Config:
  config.stages        'sft,samples,dpo' (',' or '+'): the stages to run, in order; the stages
                       they refer to (the fields their type declares as refs) are added first.
  config.stage.<name>  one block per stage: `type` (a registered stage type) and its options.
  config.models.<role> the models of the pipeline by role (`kuaijax.stages.roles`); a stage's
                       `model` field names the role it trains or uses (default 'policy').
  config.seeds         training seeds, e.g. (0, 1, 2): the pipeline runs once per seed in
                       `<workdir>/seed_<s>/<stage>/`; seed-free stages (a type registered with
                       seeded=False whose refs are seed-free too) run once in
                       `<workdir>/shared/<stage>/`, and so does a seeded stage whose block sets
                       `shared_seed: s` (e.g. one SFT policy for every post-training seed: it
                       trains once with pipeline seed s; its refs must be shared too). Each
                       stage's seeds are derived from the pipeline seed and its name
                       (`kuaijax.stages.base.stage_seed`).
  config.evals         evaluators by name (`kuaijax.evals.registry`), run on every stage that
                       produces parameters unless its block says `evaluate=False`; results in that
                       stage's `stage.json`.

Each stage, when it finishes, writes `stage.json` (its summary, evaluation, the data set or
parameters it produced, the model role). Re-running the same command skips finished stages
untouched, resumes a killed training stage from its last checkpoint (params, optimizer, step and
data iterator) and redoes an unfinished non-training stage (data sets are written atomically).
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import logging

from kuaijax import parallel
from kuaijax.data import tasks, tokenizers
from kuaijax.evals import registry as eval_registry
from kuaijax.stages import roles
from kuaijax.stages.base import DEFAULT_ROLE, STAGE_FILE, Stage, get_stage_type

SHARED_DIR = 'shared'


def parse_stage_list(text: str) -> list[str]:
  return [s.strip() for s in text.replace('+', ',').split(',') if s.strip()]


def stage_refs(config, name: str) -> list[str]:
  """The stages that stage `name` refers to, through the ref fields its type declares."""
  block = config.stage[name]
  refs = []
  for field in get_stage_type(block.type).refs:
    value = block.get(field, '')
    if isinstance(value, str) and value in config.stage and value not in refs:
      refs.append(value)
  return refs


def stage_order(config) -> list[str]:
  """`config.stages` with the stages they refer to first (each once), validated."""
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
    for ref in stage_refs(config, name):
      visit(ref, name)
    visiting.pop()
    order.append(name)

  for name in requested:
    visit(name, '')
  return order


def shared_stages(config, order: list[str]) -> set[str]:
  """The stages that run once for every seed: seed-free types, and blocks with a `shared_seed`,
  whose refs all run once too."""
  shared = set()
  for name in order:  # refs come first in `order`
    block = config.stage[name]
    refs_shared = all(r in shared for r in stage_refs(config, name))
    if block.get('shared_seed') is not None:
      if not isinstance(block.shared_seed, int):
        raise ValueError(f'stage.{name}.shared_seed={block.shared_seed!r} must be an int seed')
      if not refs_shared:
        per_seed = sorted(r for r in stage_refs(config, name) if r not in shared)
        raise ValueError(
          f'stage.{name}.shared_seed: the stage runs once for every seed, but it refers to '
          f'per-seed stages {per_seed}'
        )
      shared.add(name)
    elif not get_stage_type(block.type).seeded and refs_shared:
      shared.add(name)
  return shared


def training_seeds(config) -> tuple[int, ...]:
  """`config.seeds` checked: a non-empty tuple of distinct ints."""
  seeds = tuple(config.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) for s in seeds):
    raise ValueError(f'config.seeds={seeds!r} must be distinct ints, at least one')
  return seeds


def seed_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f'seed_{seed}')


class Pipeline:
  """Shared by the stages of one run: tokenizer, task, evaluators (built once, on first use)."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    for role in config.models:
      roles.model_section(config, role)  # a missing HF folder fails here, before any stage runs
    self.task = tasks.get_task(config.data.task) if config.data.get('task') else None
    self._tokenizer = None
    self._evaluators = None

  @property
  def tokenizer(self):
    """`config.data.tokenizer`; 'hf' reads tokenizer.json from the policy role's HF folder (or
    the first imported role's)."""
    if self._tokenizer is None:
      dc = self.config.data
      policy_first = sorted(self.config.models, key=lambda role: role != DEFAULT_ROLE)
      folders = (roles.hf_folder(self.config, role) for role in policy_first)
      hf_path = next((folder for folder in folders if folder), '')
      self._tokenizer = tokenizers.get_tokenizer(
        dc.tokenizer, spm_model_path=dc.get('spm_model_path') or None, hf_path=hf_path or None
      )
      for role, size in roles.vocab_sizes(self.config).items():
        if self._tokenizer.vocab_size > size:
          raise ValueError(
            f'models.{role}.vocab_size={size} is smaller than the tokenizer vocabulary '
            f'({self._tokenizer.vocab_size})'
          )
    return self._tokenizer

  def mesh_and_rules(self):
    """The configured mesh and logical axis rules (every model role shares them)."""
    return (
      parallel.mesh_from_config(self.config.parallel),
      parallel.rules_dict(self.config.parallel.rules),
    )

  def eval_context(self, **extra) -> eval_registry.EvalContext:
    mesh, rules = self.mesh_and_rules()
    return eval_registry.EvalContext(
      tokenizer=self.tokenizer,
      task=self.task,
      data=self.config.data,
      mesh=mesh,
      rules=rules,
      load_model=lambda path, role: roles.load(self.config, roles.source_of_path(path, role)),
      **extra,
    )

  def evaluators(self):
    if self._evaluators is None:
      self._evaluators = eval_registry.build_evaluators(self.config.evals, self.eval_context())
    return self._evaluators


def _write_json(path: str, value: dict) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True, default=float)
  os.replace(tmp, path)


def _run_stage(pipe: Pipeline, name: str, folder: str, seed: int | None, done: dict) -> dict:
  """Runs one stage in `folder` (or reads its finished `stage.json`); returns its info."""
  block = pipe.config.stage[name]
  path = os.path.join(folder, STAGE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      info = json.load(f)
    if info.get('block') != json.loads(json.dumps(block.to_dict())):
      logging.warning('stage %s finished earlier with a different config; kept as it is', folder)
    return {**info, 'dir': folder}
  start = time.time()
  os.makedirs(folder, exist_ok=True)
  stage = Stage(name, block, pipe, folder, seed, dict(done))
  summary = get_stage_type(block.type).fn(stage)
  info = {'name': name, 'type': block.type, 'seed': seed, 'summary': summary, **stage.outputs}
  # Parameters a stage recorded without evaluating them (a `params` stage) are loaded once here:
  # that checks them (a wrong checkpoint fails now, clearly) and the pipeline's evaluators, built
  # only when a stage needs them, score them. A stage that evaluated itself is left as it is.
  if 'params' in info and 'eval' not in info:
    with stage.axis_rules():
      graphdef, params = roles.load(pipe.config, stage.own_params())
      evaluators = pipe.evaluators() if block.get('evaluate', 1) else None
      if evaluators and evaluators.evaluators:
        info['eval'] = evaluators.evaluate(graphdef, params)
  info.update(block=block.to_dict(), wall_s=time.time() - start)
  if jax.process_index() == 0:
    _write_json(path, info)
  parallel.sync(f'kuaijax_stage_done_{folder}')  # every process sees the same finished stages
  return {**info, 'dir': folder}


def run_pipeline(config, workdir: str) -> dict[int, dict[str, dict]]:
  """Runs (or resumes) the configured stages for every seed of `config.seeds`.

  Returns {seed: {stage name: its `stage.json` content plus 'dir', its folder}}, seed-free stages
  included under every seed.
  """
  seeds = training_seeds(config)
  order = stage_order(config)
  for name in order:  # a misnamed model role fails now, not after hours of earlier stages
    if config.stage[name].get('model'):
      roles.check_role(config, config.stage[name].model, f'stage {name}')
  shared = shared_stages(config, order)
  pipe = Pipeline(config, workdir)
  once: dict[str, dict] = {}
  runs: dict[int, dict[str, dict]] = {}
  for seed in seeds:
    done: dict[str, dict] = {}
    for name in order:
      if name in shared:
        if name not in once:
          folder = os.path.join(workdir, SHARED_DIR, name)
          once[name] = _run_stage(pipe, name, folder, config.stage[name].get('shared_seed'), done)
        done[name] = once[name]
      else:
        done[name] = _run_stage(pipe, name, os.path.join(seed_dir(workdir, seed), name), seed, done)
    runs[seed] = done
  return runs
