"""The method interface: records -> examples, `loss_fn(model, batch, rng, frozen)`, reference, rollout.

A post-training method is a `Method` subclass registered by name (`register_method`). The training
stage of the pipeline (`kuaijax.stages.builtin`) builds it as `cls(ctx, loss=<stage>.loss,
**<stage>.options)` and then:
  1. `examples, stats = method.examples(records)`: the stage's input records (task records or a
     previous stage's data set) -> fixed-shape example dicts of numpy arrays;
  2. if `method.needs_reference`: `examples = method.prepare(examples, ref_graphdef, ref_params)`
     (e.g. precompute reference log-probs), and `frozen = ref_params if method.frozen_reference`
     (a role with LoRA adapters passes no params: its reference is the base, see `reference_model`);
  3. trains with `loss_fn(model, batch, rng, frozen)` (frozen is None without a reference) and, when
     the method defines `rollout(model, batch, rng) -> batch`, runs it on every host batch with the
     current policy first (online methods such as GRPO).
`count_tokens(batch)` tells the trainer how many tokens a batch processes (for tokens/s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from flax import nnx

from kuaijax.data.sequences import completion_ids
from kuaijax.data.tasks import Task
from kuaijax.models import lora
from kuaijax.registry import Registry


@dataclasses.dataclass(frozen=True)
class MethodContext:
  """What every method may use: tokenizer, task (answer checking), and the sequence geometry.

  seq_len: width of training rows (prompt + completion); prompt_len / max_new_tokens: generation
  prompt width and completion budget (rollouts); pack: pack several short sequences per row.
  """

  tokenizer: object
  task: Task | None
  seq_len: int
  prompt_len: int
  max_new_tokens: int
  pack: bool = True


class Method:
  """Base class; see the module docstring. Subclasses set `name` through `register_method`."""

  name = ''
  rollout: Callable | None = None

  def __init__(self, ctx: MethodContext, *, loss: dict | None = None):
    self.ctx = ctx
    self.loss = dict(loss or {})

  @property
  def needs_reference(self) -> bool:
    """Whether the stage must name a `reference` (a stage or checkpoint path)."""
    return False

  @property
  def frozen_reference(self) -> bool:
    """Whether the reference params ride along as the trainer's `frozen` argument."""
    return self.needs_reference

  def examples(self, records: Sequence[dict]) -> tuple[list[dict], dict]:
    raise NotImplementedError

  def prepare(self, examples: list[dict], graphdef, params) -> list[dict]:
    """Examples with whatever the reference contributes offline (default: unchanged)."""
    del graphdef, params
    return examples

  def loss_fn(self, model, batch: dict, rng, frozen=None):
    raise NotImplementedError

  def count_tokens(self, batch: dict) -> int:
    """Token positions a batch runs through the model: every int [.., L] token field."""
    return sum(int(np.size(batch[k])) for k in self.token_fields if k in batch)

  token_fields: tuple[str, ...] = ('inputs',)


METHODS = Registry('method')
get_method = METHODS.lookup


def register_method(name: str):
  """Class decorator: `@register_method('rft') class RFT(Method): ...`."""

  def register(cls):
    cls.name = name
    return METHODS.register(name)(cls)

  return register


def reference_model(model, frozen):
  """The frozen reference inside `loss_fn`: the `frozen` params in the model's graph, or, when the
  model trains LoRA adapters, the model with its adapters off (the base, sharing its arrays)."""
  if lora.adapters(model):
    return lora.without_adapters(model)
  return nnx.merge(nnx.graphdef(model), frozen)


def tokens_or_text(record: dict, key: str, tokenizer) -> np.ndarray:
  """A completion's tokens: `record[key + '_tokens']` when stored (a model's own sample, exactly as
  generated), else the text `record[key]` encoded with eos."""
  if f'{key}_tokens' in record:
    return np.asarray(record[f'{key}_tokens'], np.int32)
  return completion_ids(tokenizer, record[key])
