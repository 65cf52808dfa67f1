"""The evaluator interface: `evaluate(graphdef, params, step) -> {name: value}`.

The trainer holds the model split as (graphdef, params) and hands exactly that to evaluators, so
nothing is merged and re-split per evaluation; compiled functions are cached per graph
(`kuaijax.jit_cache.ParamsJit`). Calling an evaluator on a model (`evaluator(model)`) splits it
once, for notebooks and tests.
"""

from __future__ import annotations

from flax import nnx

from kuaijax.jit_cache import split_params


class Evaluator:
  """Subclasses implement `evaluate(graphdef, params, step=None) -> dict`."""

  def evaluate(self, graphdef: nnx.GraphDef, params, step: int | None = None) -> dict:
    raise NotImplementedError

  def __call__(self, model: nnx.Module, step: int | None = None) -> dict:
    graphdef, params = split_params(model)
    return self.evaluate(graphdef, params, step)


class Evaluators(Evaluator):
  """Several evaluators as one; their metrics are merged (a name reported twice is an error)."""

  def __init__(self, evaluators: dict[str, Evaluator]):
    self.evaluators = dict(evaluators)

  def evaluate(self, graphdef, params, step=None) -> dict:
    out = {}
    for name, evaluator in self.evaluators.items():
      metrics = evaluator.evaluate(graphdef, params, step)
      clash = sorted(set(out) & set(metrics))
      if clash:
        raise ValueError(f'evaluator {name!r} reports metrics already reported: {clash}')
      out.update(metrics)
    return out
