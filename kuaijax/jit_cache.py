"""One compiled function per model graph, called with the model's split parameters.

Evaluators, reference scoring and rollouts all need "jit `fn(model, *args)` once per model
architecture, then call it with whatever parameters": `ParamsJit` is that cache.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, params as a pure dict): the form the trainer keeps and hands to evaluators."""
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


class ParamsJit:
  """`ParamsJit(fn)(graphdef, params, *args) == fn(nnx.merge(graphdef, params), *args)`, jitted
  once per graphdef (`jit_options` go to `jax.jit`, e.g. static_argnames)."""

  def __init__(self, fn: Callable, **jit_options):
    self._fn, self._options, self._compiled = fn, jit_options, {}

  def __call__(self, graphdef: nnx.GraphDef, params, *args, **kwargs):
    if graphdef not in self._compiled:
      fn = self._fn
      self._compiled[graphdef] = jax.jit(
        lambda p, *a, **k: fn(nnx.merge(graphdef, p), *a, **k), **self._options
      )
    return self._compiled[graphdef](params, *args, **kwargs)
