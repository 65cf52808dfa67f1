"""LoRA adapters on any linear weight of a kuaijax model (Hu et al. 2021; rsLoRA: Kalajdzievski 2023).

An adapted weight W [*in, *out] (stacked experts: [E, *in, *out]) gains a low-rank pair of
`LoRAParam`s A [*in, r] and B [r, *out] (one pair per expert), and acts as W + scale A B with
scale = alpha / r (alpha / sqrt(r) with rsLoRA). A starts uniform in +-1/sqrt(fan_in) and B at zero,
as in PEFT, so a fresh adapter leaves the model's function unchanged.

Adapters sit next to the weight they adapt (`wq` -> `wq_lora`): the base parameters keep their
paths, so base checkpoints and Hugging Face folders load as they are and the adapters form their
own subtree, which `split_params` / `join_params` separate in pure-dict parameter trees (the
trainer optimises and checkpoints only that subtree). Modules list their linear weights in
`LINEAR_WEIGHTS`; `kuaijax.models.layers.linear` runs dense weights as x W + scale (drop(x) A) B
(no gradient work for W) and `layers.adapted` merges the update into weights consumed whole
(stacked and shared experts, the LM head), so MoE dispatch code is unchanged. Dropout applies on
the low-rank path of dense weights during training steps (`seed_dropout`), as PEFT does; merged
weights have none (PEFT refuses dropout on expert parameters too).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from kuaijax.config_lib import dataclass_from_section
from kuaijax.models.layers import ADAPTER_SUFFIX, dense

# Dropout keys are fold_in(step rng, _DROPOUT_STREAM + adapter index): apart from a method's own.
_DROPOUT_STREAM = 1 << 20
# The attention projections and every SwiGLU (dense, routed and shared experts); not the head.
DEFAULT_TARGETS = ('w[qkvo]', '(shared_)?w[123]')


class LoRAParam(nnx.Param):
  """A low-rank adapter factor: trained while the base parameters stay frozen."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """A role's `lora` section; validated on construction.

  rank: r > 0. alpha: the scale numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).
  dropout: on the adapters' input of dense weights while training, in [0, 1).
  targets: regular expressions; a weight is adapted when one fully matches its name ('wq') or
  its dotted path ('layers.0.attn.wq', 'layers.1.mlp.w1'). Every target must match some weight.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  rslora: bool = False

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f'lora.rank={self.rank!r} must be a positive int')
    if not isinstance(self.alpha, int | float) or not self.alpha > 0:
      raise ValueError(f'lora.alpha={self.alpha!r} must be a number > 0')
    if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
      raise ValueError(f'lora.dropout={self.dropout!r} must be in [0, 1)')
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    if not targets:
      raise ValueError('lora.targets is empty: name at least one weight (e.g. "wq")')
    for t in targets:
      try:
        re.compile(t)
      except re.error as e:
        raise ValueError(f'lora.targets: {t!r} is not a regular expression ({e})') from None
    object.__setattr__(self, 'targets', targets)

  @classmethod
  def from_config(cls, section: Mapping) -> LoRAConfig:
    """From a `lora` config section, naming unknown keys."""
    return dataclass_from_section(cls, section, 'lora')

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRA(nnx.Module):
  """The adapter of one weight: A [*lead, *in, r], B [*lead, r, *out] (lead = the expert axis of
  stacked experts, recognised by the weight's logical axis 'expert')."""

  def __init__(self, weight: nnx.Param, in_dims: int, cfg: LoRAConfig, *, rngs: nnx.Rngs):
    axes = tuple(weight.get_metadata()['logical_axes'])
    shape = weight.shape
    lead = 1 if axes[0] == 'expert' else 0
    split = lead + in_dims
    self.in_dims, self.scale, self.dropout = in_dims, cfg.scale, float(cfg.dropout)
    self.enabled = True
    fan_in = math.prod(shape[lead:split])
    bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming_uniform(a=sqrt(5)) on lora_A
    self.a = LoRAParam(
      jax.random.uniform(rngs.params(), (*shape[:split], cfg.rank), jnp.float32, -bound, bound),
      logical_axes=(*axes[:split], None),
    )
    self.b = LoRAParam(
      jnp.zeros((*shape[:lead], cfg.rank, *shape[split:]), jnp.float32),
      logical_axes=(*axes[:lead], None, *axes[split:]),
    )

  def delta(self) -> jax.Array:
    """scale * A B in the weight's shape (float32)."""
    a, b = self.a[...], self.b[...]
    if a.ndim - self.in_dims == 2:  # stacked experts
      e, r = a.shape[0], a.shape[-1]
      ab = jnp.einsum('eir,ero->eio', a.reshape(e, -1, r), b.reshape(e, r, -1))
      return self.scale * ab.reshape(*a.shape[:-1], *b.shape[2:])
    return self.scale * dense(a, b.reshape(b.shape[0], -1)).reshape(*a.shape[:-1], *b.shape[1:])

  def __call__(self, x: jax.Array, dtype) -> jax.Array:
    """The low-rank path scale * drop(x) A B of a dense weight."""
    rng = getattr(self, 'dropout_rng', None)  # set per training step by `seed_dropout`
    if self.dropout and rng is not None:
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    h = dense(x, self.a[...].astype(dtype), self.in_dims)
    return self.scale * dense(h, self.b[...].astype(dtype))


def linear_weights(model: nnx.Module) -> dict[str, tuple[nnx.Module, str, int]]:
  """Dotted path -> (module, weight name, input dims) of every linear weight the model has."""
  out = {}
  for path, module in nnx.iter_modules(model):
    for name, in_dims in getattr(type(module), 'LINEAR_WEIGHTS', {}).items():
      if isinstance(getattr(module, name, None), nnx.Param):
        out['.'.join(map(str, (*path, name)))] = (module, name, in_dims)
  return out


def adapters(model: nnx.Module) -> dict[str, LoRA]:
  """Dotted path of the adapted weight -> its adapter."""
  return {
    path: getattr(module, name + ADAPTER_SUFFIX)
    for path, (module, name, _) in linear_weights(model).items()
    if isinstance(getattr(module, name + ADAPTER_SUFFIX, None), LoRA)
  }


def apply(model: nnx.Module, cfg: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
  """Attaches adapters to the weights `cfg.targets` select; returns their dotted paths.

  Raises ValueError when a target matches no weight (naming it and the weights there are) or a
  weight already has an adapter.
  """
  weights = linear_weights(model)
  chosen, unmatched = [], []
  for target in cfg.targets:
    hits = [p for p in weights if re.fullmatch(target, p) or re.fullmatch(target, weights[p][1])]
    if not hits:
      unmatched.append(target)
    chosen += [p for p in hits if p not in chosen]
  if unmatched:
    names = sorted({name for _, name, _ in weights.values()})
    raise ValueError(
      f'lora.targets {unmatched} match no linear weight of the model; its weights are {names} '
      f'(paths such as {next(iter(weights), "none")!r})'
    )
  chosen.sort(key=list(weights).index)  # model order: adapters draw their init in that order
  for path in chosen:
    module, name, in_dims = weights[path]
    if hasattr(module, name + ADAPTER_SUFFIX):
      raise ValueError(f'{path} already has a LoRA adapter')
    setattr(module, name + ADAPTER_SUFFIX, LoRA(getattr(module, name), in_dims, cfg, rngs=rngs))
  return chosen


def without_adapters(model: nnx.Module) -> nnx.Module:
  """The base model: a view of `model` whose adapters are switched off, sharing its arrays (the
  frozen reference of preference and RL methods costs no second copy of the weights)."""
  view = nnx.merge(*nnx.split(model))
  for adapter in adapters(view).values():
    adapter.enabled = False
  return view


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its weight (W + scale A B, in W's dtype) and removes it, in place:
  the result is a plain model of the base architecture."""
  weights = linear_weights(model)
  for path, adapter in adapters(model).items():
    module, name, _ = weights[path]
    weight = getattr(module, name)
    weight[...] = (weight[...].astype(jnp.float32) + adapter.delta()).astype(weight.dtype)
    delattr(module, name + ADAPTER_SUFFIX)
  return model


def seed_dropout(model: nnx.Module, rng: jax.Array) -> None:
  """Gives each adapter with dropout its key for this step (training only; otherwise no dropout)."""
  for i, adapter in enumerate(adapters(model).values()):
    if adapter.dropout:
      adapter.dropout_rng = nnx.data(jax.random.fold_in(rng, _DROPOUT_STREAM + i))


def _is_adapter_key(key) -> bool:
  return isinstance(key, str) and key.endswith(ADAPTER_SUFFIX)


def split_params(tree: Mapping) -> tuple[dict, dict]:
  """(adapters, base) of a pure-dict parameter tree (or any tree of the same nested dicts, such as
  its shardings); both keep the nesting, and `join_params` puts them back together."""
  lora, base = {}, {}
  for key, value in tree.items():
    if _is_adapter_key(key):
      lora[key] = value
    elif isinstance(value, Mapping):
      sub_lora, sub_base = split_params(value)
      if sub_lora:
        lora[key] = sub_lora
      if sub_base:
        base[key] = sub_base
    else:
      base[key] = value
  return lora, base


def join_params(first: Mapping, second: Mapping) -> dict:
  """The union of two disjoint nested-dict trees (inverse of `split_params`)."""
  out = dict(first)
  for key, value in second.items():
    out[key] = join_params(out[key], value) if key in out else value
  return out


def trainable_split(params: Mapping) -> tuple[dict, dict]:
  """(trained, frozen): (adapters, base) for a model with adapters, else (params, {})."""
  lora, base = split_params(params)
  return (lora, base) if lora else (dict(params), {})


def merged_params(graphdef: nnx.GraphDef, params: Mapping) -> dict:
  """The plain (merged) pure-dict params of a model with adapters."""
  model = merge(nnx.merge(graphdef, dict(params)))
  return nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
