"""Evaluators by name, as in big_vision: `config.evals.<name>.type` picks the kind, the rest of the
block its options. Every experiment builds its evaluators with `build_evaluators(config.evals, ctx)`.

A kind is a builder `(options: dict, ctx: EvalContext) -> Evaluator` (or None when its options
leave nothing to evaluate, e.g. multiple_choice with no tasks), registered where the evaluator is
defined with `@register_evaluator('name')`; its docstring lists the options. No central list
imports them: a kind not registered yet is found by importing every module of `kuaijax.evals`
(the built-in kinds: lm_loss, moe_stats, multiple_choice, task_accuracy, passkey, kj_dialog8,
kj_dialog_pairs, mt_bench, ...) or, for a dotted kind 'mylab.evals.score', the module
'mylab.evals'. Evaluator modules import `register_evaluator` from here; this module imports none
of them.

An evaluator that names another stage of the pipeline (a reference policy) finds it through
`current_stage()`: the pipeline's 'train' stages set it (`stage_scope`) around their evaluations to
the stage's name and the parameters of the stages of the same run (seed) finished before it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Mapping, Sequence

from kuaijax.evals.base import Evaluators
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
  # (a checkpoint path or Hugging Face folder, model role) -> (graphdef, params) on the mesh: how
  # an evaluator loads another model (a judge, a reference policy); given by the stage pipeline
  load_model: Callable[[str, str], tuple] | None = None

  def require_lm_batches(self, kind: str) -> Sequence[dict]:
    """The LM evaluation batches, or a clear error for an evaluator `kind` that needs them."""
    if not self.lm_batches:
      raise ValueError(f'evaluator {kind!r} needs LM evaluation batches (an LM data section)')
    return self.lm_batches


@dataclasses.dataclass(frozen=True)
class StageScope:
  """The pipeline stage whose model is being evaluated: its name, and per stage of the same run
  finished before it that recorded parameters, (path, model role) as `EvalContext.load_model`
  takes them."""

  name: str
  params: Mapping[str, tuple[str, str]]


_STAGE_SCOPE: contextvars.ContextVar[StageScope | None] = contextvars.ContextVar(
  'kuaijax_eval_stage_scope', default=None
)


@contextlib.contextmanager
def stage_scope(name: str, params: Mapping[str, tuple[str, str]]):
  """Evaluations inside this block evaluate stage `name`; `params`: {finished stage: (path,
  role)}."""
  token = _STAGE_SCOPE.set(StageScope(name, dict(params)))
  try:
    yield
  finally:
    _STAGE_SCOPE.reset(token)


def current_stage() -> StageScope | None:
  """The `stage_scope` of the evaluation in progress (None outside the pipeline's stages)."""
  return _STAGE_SCOPE.get()


# kind -> builder(options: dict, ctx: EvalContext) -> Evaluator | None
EVALUATORS = Registry('evaluator', package='kuaijax.evals')
register_evaluator = EVALUATORS.register


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
