"""Evaluators by name, as in big_vision: `config.evals.<name>.type` picks the kind, the rest of the
block its options. Every experiment builds its evaluators with `build_evaluators(config.evals, ctx)`.

Kinds (options in brackets):
  lm_loss          loss / perplexity per task on the LM evaluation batches (ctx.lm_batches)
  moe_stats        experts per token per task and layer, on the same batches
  moe_token_loss   per layer: most experts any token used, and the Spearman correlation of token
                   loss vs experts selected (overall and per task), on the same batches
  multiple_choice  zero-shot accuracy [tasks (list of {name, source, format, ...}), max_len,
                   batch_size]
  task_accuracy    accuracy of generations, checked by the task [split, groups, per_group, seeds,
                   temperature, greedy, batch_size]; widths from config.data (prompt_len,
                   max_new_tokens)
  passkey          retrieval by context length [context_lengths, depths, per_depth, batch_size,
                   template, seed]
  kj_dialog8       multi-turn exact match per turn with own / gold history, context-dependent split
                   and context sensitivity [split, sessions, num_turns, history, batch_size]; widths
                   from config.data (seq_len, max_new_tokens)
Register another with `register_evaluator('name')`: a builder `(options: dict, ctx) -> Evaluator`
(or None when its options leave nothing to evaluate, e.g. multiple_choice with no tasks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kuaijax.evals.base import Evaluators
from kuaijax.evals.lm_loss import LMEvaluator
from kuaijax.evals.moe_stats import MoEStatsEvaluator, TokenLossExperts
from kuaijax.evals.multi_turn import DialogEvaluator, load_sessions
from kuaijax.evals.multiple_choice import build_evaluator as build_multiple_choice
from kuaijax.evals.passkey import PasskeyEvaluator
from kuaijax.evals.task_accuracy import TaskAccuracyEvaluator, load_eval_records
from kuaijax.registry import Registry


@dataclasses.dataclass
class EvalContext:
  """What evaluators are built from: tokenizer, mesh / rules, and per kind its data."""

  tokenizer: object
  mesh: object = None
  rules: object = None
  task: object = None  # a kuaijax.data.tasks.Task (task_accuracy)
  data: object = None  # the config's data section (task_accuracy: data_dir, prompt_len, ...)
  lm_batches: Sequence[dict] | None = None  # lm_loss, moe_stats
  task_names: Sequence[str] = ()


# kind -> builder(options: dict, ctx: EvalContext) -> Evaluator | None
EVALUATORS = Registry('evaluator')
register_evaluator = EVALUATORS.register


def _lm_batches(ctx: EvalContext, kind: str):
  if not ctx.lm_batches:
    raise ValueError(f'evaluator {kind!r} needs LM evaluation batches (an LM data section)')
  return ctx.lm_batches


@register_evaluator('lm_loss')
def _lm_loss(options, ctx):
  del options
  batches = _lm_batches(ctx, 'lm_loss')
  return LMEvaluator(batches, ctx.task_names, mesh=ctx.mesh, rules=ctx.rules)


@register_evaluator('moe_stats')
def _moe_stats(options, ctx):
  del options
  batches = _lm_batches(ctx, 'moe_stats')
  return MoEStatsEvaluator(batches, ctx.task_names, mesh=ctx.mesh, rules=ctx.rules)


@register_evaluator('moe_token_loss')
def _moe_token_loss(options, ctx):
  del options
  batches = _lm_batches(ctx, 'moe_token_loss')
  return TokenLossExperts(batches, ctx.task_names, mesh=ctx.mesh, rules=ctx.rules)


@register_evaluator('multiple_choice')
def _multiple_choice(options, ctx):
  if not options['tasks']:
    return None  # no tasks configured: nothing to evaluate
  return build_multiple_choice(
    [dict(t) for t in options['tasks']],
    ctx.tokenizer,
    max_len=options['max_len'],
    batch_size=options['batch_size'],
    mesh=ctx.mesh,
    rules=ctx.rules,
  )


@register_evaluator('task_accuracy')
def _task_accuracy(options, ctx):
  if ctx.task is None:
    raise ValueError('evaluator task_accuracy needs a task (config.data.task)')
  records = load_eval_records(
    ctx.task,
    options['split'],
    per_group=options['per_group'],
    groups=tuple(options['groups']),
    data_dir=ctx.data.data_dir,
  )
  return TaskAccuracyEvaluator(
    ctx.task,
    records,
    ctx.tokenizer,
    seeds=tuple(options['seeds']),
    temperature=options['temperature'],
    greedy=options['greedy'],
    batch_size=options['batch_size'],
    prompt_len=ctx.data.prompt_len,
    max_new_tokens=ctx.data.max_new_tokens,
  )


@register_evaluator('passkey')
def _passkey(options, ctx):
  return PasskeyEvaluator(
    ctx.tokenizer,
    tuple(options['context_lengths']),
    depths=tuple(options['depths']),
    per_depth=options['per_depth'],
    batch_size=options['batch_size'],
    template=options['template'],
    seed=options['seed'],
  )


@register_evaluator('kj_dialog8')
def _kj_dialog8(options, ctx):
  return DialogEvaluator(
    ctx.tokenizer,
    load_sessions(options['split'], limit=options['sessions'], data_dir=ctx.data.data_dir),
    num_turns=options['num_turns'],
    history=options['history'],
    seq_len=ctx.data.seq_len,
    max_new_tokens=ctx.data.max_new_tokens,
    batch_size=options['batch_size'],
  )


def build_evaluators(evals_config, ctx: EvalContext) -> Evaluators:
  """`config.evals` ({name: {type, ...options}}) -> one `Evaluators` (empty when no block)."""
  built = {}
  for name, block in (evals_config or {}).items():
    options = dict(block.to_dict() if hasattr(block, 'to_dict') else block)
    kind = options.pop('type', name)
    builder = EVALUATORS.lookup(kind)
    try:
      evaluator = builder(options, ctx)
    except KeyError as e:
      raise ValueError(f'evals.{name} ({kind}) misses option {e}') from None
    if evaluator is not None:
      built[name] = evaluator
  return Evaluators(built)


# Evaluators that register themselves in their own modules (imported here for the registration).
from kuaijax.evals import early_exit, self_agreement  # noqa: E402, F401
