"""The built-in stage types: 'train' (a post-training method on records), 'sample' (a policy's
samples of the task's prompts) and 'params' (parameters from a checkpoint or a Hugging Face folder).
"""

from __future__ import annotations

import os

from flax import nnx

from kuaijax import parallel
from kuaijax.data import sequences
from kuaijax.evals import registry as eval_registry
from kuaijax.methods import MethodContext, get_method
from kuaijax.models import lora
from kuaijax.sampling import sample_completions
from kuaijax.stages import roles
from kuaijax.stages.base import Stage, cycle, params_of, register_stage_type
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train import lm_task
from kuaijax.train.trainer import check_batch_config, param_layout, train

MERGED_DIR = 'merged'  # a LoRA training stage's merged model, under its folder


def method_context(stage: Stage) -> MethodContext:
  dc = stage.config.data
  return MethodContext(
    tokenizer=stage.tokenizer,
    task=stage.task,
    seq_len=dc.seq_len,
    prompt_len=dc.prompt_len,
    max_new_tokens=dc.max_new_tokens,
    pack=dc.pack,
  )


def stage_train_config(stage: Stage, *, seed: int):
  """The trainer's config for a training stage: the shared sections with the block's `train` /
  `optimizer` overrides, `model` = the stage's role and its initial params: `init_from` (a stage
  or checkpoint path) if set, else the role's Hugging Face folder if it is imported, else scratch."""
  b = stage.block
  if stage.config.models[stage.role].get(roles.PEFT_KEY):
    raise ValueError(
      f'stage {stage.name}: model role {stage.role!r} imports a PEFT adapter, which training '
      "stages do not start from; train from a 'params' stage of the role (init_from=<it>)"
    )
  out = roles.role_config(stage.config, stage.role)
  out.train.update(b.train.to_dict())
  out.optimizer.update(b.optimizer.to_dict())
  out.train.seed = seed
  out.init_from = ''
  if b.init_from:
    source = stage.params_source(b.init_from)
    if source.params_format == 'hf':
      out.init_from_hf = source.path
    else:
      out.init_from, out.init_from_hf = source.path, ''
  out.lock()
  return out


def check_lora_reference(stage: Stage) -> None:
  """A role with LoRA adapters uses its base as the reference (no second copy of the weights):
  the stage's `reference` must be the parameters the adapters train on."""
  b = stage.block
  if b.init_from:
    base = stage.params_source(b.init_from).path
  else:
    base = roles.hf_folder(stage.config, stage.role)
  if stage.params_source(b.reference).path != base:
    raise ValueError(
      f'stage {stage.name}: model role {stage.role!r} trains LoRA adapters, whose reference is '
      f'their base ({base or "scratch"}); reference={b.reference!r} names other parameters'
    )


def record_params(stage: Stage, result) -> None:
  """Records a training stage's parameters for later stages: its checkpoints, or, for a role with
  LoRA adapters (whose checkpoints hold only the adapters), the merged plain model written to
  `<stage>/merged` (`kuaijax.models.lora.merged_params`)."""
  if not roles.lora_section(stage.config, stage.role):
    stage.set_params(stage.dir)
    return
  path = os.path.join(stage.dir, MERGED_DIR)
  with stage.axis_rules():
    merged = lora.merged_params(result.graphdef, result.params)
  ckpt_lib.save_params(path, merged, result.step)
  stage.set_params(path)


def eval_scope(stage: Stage):
  """`kuaijax.evals.registry.stage_scope` for the evaluations of `stage`: its name and the
  parameters of the stages finished before it (an evaluator's reference policy, e.g. CaPO pairs)."""
  finished = {name: params_of(info) for name, info in stage.done.items() if 'params' in info}
  return eval_registry.stage_scope(
    stage.name, {name: (src.path, src.role) for name, src in finished.items()}
  )


@register_stage_type('train', refs=('init_from', 'reference', 'data'))
def train_stage(stage: Stage) -> dict:
  """Trains the role `model` (default 'policy') with `method` (a name in
  `kuaijax.methods.METHODS`) on `data` ('task:<split>' or a stage name).

  Options: init_from (a stage name or checkpoint path; '' = the role's HF folder or scratch),
  reference (a stage name or path, for methods that need one), options (the method's keyword
  options), loss (forwarded to its loss function), train / optimizer (overrides of the shared
  sections), evaluate (False: a model that is not a policy, e.g. a reward model, skips
  `config.evals`).
  """
  b = stage.block
  method = get_method(b.method)(method_context(stage), loss=b.loss.to_dict(), **b.options.to_dict())
  examples, stats = method.examples(stage.records(b.data))
  frozen = None
  cfg = stage_train_config(stage, seed=stage.seed('train'))
  if method.needs_reference:
    if not b.reference:
      raise ValueError(f'stage {stage.name}: method {b.method!r} needs reference=<stage or path>')
    if cfg.model_lora:
      check_lora_reference(stage)
    if not (cfg.model_lora and method.frozen_reference):  # LoRA: the base is the frozen reference
      graphdef, ref_params = stage.load_model(b.reference)
      with stage.axis_rules():
        examples = method.prepare(examples, graphdef, ref_params)
      frozen = ref_params if method.frozen_reference else None
  factory = lm_task.model_factory(cfg.model, cfg.model_lora)
  layout = param_layout(cfg, factory)
  micro = check_batch_config(cfg.train, layout.mesh, layout.rules)
  dataset = sequences.in_memory_dataset(
    examples, batch_size=micro, seed=stage.seed('data'), **parallel.this_process()
  )
  evaluators = stage.pipeline.evaluators()
  with eval_scope(stage):
    result = train(
      cfg,
      stage.dir,
      model_factory=factory,
      loss_fn=method.loss_fn,
      train_dataset=dataset,
      evaluate=evaluators.evaluate if evaluators.evaluators and b.get('evaluate', True) else None,
      frozen=frozen,
      prepare_batch=method.rollout,
      count_tokens=method.count_tokens,
    )
  record_params(stage, result)
  stage.outputs['eval'] = result.last_eval
  last = result.history[-1] if result.history else {}
  return {**stats, 'steps': result.step, 'last_train_metrics': last}


@register_stage_type('sample', refs=('policy', 'data'))
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


@register_stage_type('params', seeded=False)
def params_stage(stage: Stage) -> dict:
  """The parameters of the role `model` (default 'policy') from `path` (a kuaijax workdir or
  checkpoints folder), or, with no path, from the role's Hugging Face folder: later stages start
  from them or read them. The runner loads them once (a wrong checkpoint fails there) and, with
  `config.evals`, evaluates them as they are."""
  path, folder = stage.block.get('path', ''), roles.hf_folder(stage.config, stage.role)
  if not path and not folder:
    raise ValueError(
      f'stage {stage.name}: type params needs path=<workdir or checkpoints folder>, or a model '
      f'role with an hf folder (models.{stage.role} has none)'
    )
  if path:
    stage.set_params(path)
  else:
    stage.set_params(folder, params_format='hf')
  return {'path': path or folder}
