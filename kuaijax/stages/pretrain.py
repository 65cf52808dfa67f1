"""The 'pretrain' stage type: a model role trained from scratch (or from `init_from`) as a language
model on the corpus of `config.data` (`kuaijax.train.lm_task`).

Block (`kuaijax.config_lib.pretrain_stage`):
  model        the model role trained (`config.models.<role>`; default 'policy')
  init_from    a stage name or checkpoint path to start from ('' = scratch, or the role's HF folder)
  train        overrides of the shared `config.train` section for this stage (steps, batch_size)
  optimizer    overrides of the shared `config.optimizer` section
  aux_loss     weights of the MoE layers' auxiliary losses: balance_weight, entropy_weight,
               z_loss_weight, aux_reduce ('mean' | 'sum' over layers); a dense model reports none.
               They belong to the training objective, so to the stage, not to the role.
  final_evals  evaluators by name (as `config.evals`) run once on the final parameters, e.g. a
               passkey retrieval test of some variants only
  evaluate     False: no evaluation at all

Seeds: the trainer's `train.seed` (parameter init and step rngs) is the training seed itself and the
data order is `data.seed + training seed`, so every stage of one seed starts from the same init seed
and sees the same batches in the same order (a paired comparison of variants), and a pipeline with
`config.seeds=(0,)` trains exactly as a lone `train.seed=0` run.

Evaluation: `config.evals` (lm_loss, moe_stats, multiple_choice, ...) are built here on this stage's
LM evaluation batches and run every `train.eval_every` steps; the final evaluation (plus
`final_evals`) is the stage's `eval` in `stage.json`, so the runner does not evaluate it again.
A SentencePiece tokenizer is trained once per pipeline, into `<workdir>/shared/`.
"""

from __future__ import annotations

import os

from kuaijax.config_lib import check_choice
from kuaijax.evals import moe_stats
from kuaijax.stages.base import Stage, register_stage_type
from kuaijax.stages.builtin import stage_train_config
from kuaijax.stages.runner import SHARED_DIR
from kuaijax.train import lm_task
from kuaijax.train.trainer import train


def stage_config(stage: Stage):
  """The trainer's config of a pretrain stage: its role, overrides and seeds (module docstring)."""
  cfg = stage_train_config(stage, seed=stage.pipeline_seed)
  cfg.data.seed = stage.config.data.seed + stage.pipeline_seed
  return cfg


def tokenizer_dir(workdir: str) -> str:
  """Where the SentencePiece tokenizer trained for a pipeline in `workdir` lives (one for all
  stages and seeds)."""
  return os.path.join(workdir, SHARED_DIR)


@register_stage_type('pretrain', refs=('init_from',))
def pretrain_stage(stage: Stage) -> dict:
  """Trains the role `model` on the LM corpus (see the module docstring); summary: steps, parameter
  counts (total, activated per token), the last logged training metrics."""
  b = stage.block
  aux = b.aux_loss
  check_choice(f'stage.{stage.name}.aux_loss.aux_reduce', aux.aux_reduce, lm_task.AUX_REDUCTIONS)
  cfg = stage_config(stage)
  data = lm_task.build_lm_data(
    cfg,
    stage.dir,
    tokenizer_dir=tokenizer_dir(stage.pipeline.workdir),
    model_name=f'models.{stage.role}',
  )
  evaluate = b.get('evaluate', True)
  evaluators = lm_task.build_evaluators(cfg, data) if evaluate else None
  result = train(
    cfg,
    stage.dir,
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=lm_task.lm_loss_fn(cfg.train.z_loss, lm_task.aux_weights(aux), aux.aux_reduce),
    train_dataset=data.train_dataset,
    evaluate=evaluators.evaluate if evaluators and evaluators.evaluators else None,
  )
  stage.set_params(stage.dir)
  last_eval = dict(result.last_eval)
  if evaluate and b.final_evals:
    final = lm_task.build_evaluators(cfg, data, b.final_evals)
    with stage.axis_rules():
      extra = final.evaluate(result.graphdef, result.params, result.step)
    clash = sorted(set(extra) & set(last_eval))
    if clash:
      raise ValueError(f'stage {stage.name}: final_evals report metrics already reported: {clash}')
    last_eval.update(extra)
  stage.outputs['eval'] = last_eval
  return {
    'steps': result.step,
    'params': moe_stats.parameter_counts(result.params, last_eval),
    'last_train_metrics': result.history[-1] if result.history else {},
  }
