"""Models as named roles: `config.models.<role>` is the architecture of one model of the pipeline.

A role is either a kuaijax model section (`kuaijax.config_lib.lm_model(...)`: the fields of
`kuaijax.models.transformer.TransformerConfig`) or `{'hf': '<Hugging Face folder>', ...}` whose
model section is read from the folder's config.json, any other key overriding a field (`dtype`, MoE
routing options). Either form may carry a `lora` section (`kuaijax.models.lora.LoRAConfig` fields):
training stages of the role then train LoRA adapters on the frozen base and hand later stages the
merged plain model, so every reader of the role's parameters sees the base architecture. An
imported role may also name a PEFT adapter folder (`peft`): its Hugging Face parameters then load
with the adapter merged in (`kuaijax.hf.peft_io`).
Stages name the roles they train or read (`model='grm'`); a reward model half the
policy's size, or an imported checkpoint, is then an ordinary stage. Parameters are loaded as the
role that produced them (recorded in the producing stage's `stage.json`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import ml_collections
from flax import nnx

from kuaijax import parallel
from kuaijax.models import lora
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train import lm_task
from kuaijax.train.trainer import param_layout

HF_KEY = 'hf'
LORA_KEY = 'lora'
PEFT_KEY = 'peft'


@dataclasses.dataclass(frozen=True)
class ParamsSource:
  """Parameters to load: a kuaijax checkpoint (a workdir or its checkpoints folder) or a Hugging
  Face folder (`params_format='hf'`), holding the model role `role`."""

  path: str
  role: str
  params_format: str = 'kuaijax'


def source_of_path(path: str, role: str) -> ParamsSource:
  """A folder as parameters of `role`: a Hugging Face folder (config.json, no checkpoints/) or a
  kuaijax workdir / checkpoints folder."""
  is_hf = os.path.isfile(os.path.join(path, 'config.json')) and not os.path.isdir(
    os.path.join(path, 'checkpoints')
  )
  return ParamsSource(path, role, 'hf' if is_hf else 'kuaijax')


def check_role(config, role: str, where: str) -> None:
  if role not in config.models:
    raise ValueError(
      f'{where}: model role {role!r} is not in config.models ({sorted(config.models)})'
    )


def hf_folder(config, role: str) -> str:
  """The Hugging Face folder of an imported role, '' for a role defined by its architecture."""
  check_role(config, role, 'model role')
  return config.models[role].get(HF_KEY, '')


def model_section(config, role: str) -> ml_collections.ConfigDict:
  """The role's model section (TransformerConfig fields), read from its HF folder if imported."""
  check_role(config, role, 'model role')
  spec = config.models[role].to_dict()
  spec.pop(LORA_KEY, None)
  spec.pop(PEFT_KEY, None)
  folder = spec.pop(HF_KEY, '')
  if not folder:
    return ml_collections.ConfigDict(spec)
  section = _hf_section(folder)
  for key, value in spec.items():
    if isinstance(value, dict) and isinstance(section.get(key), dict):
      section[key] = {**section[key], **value}
    else:
      section[key] = value
  return ml_collections.ConfigDict(section)


def lora_section(config, role: str) -> dict:
  """The role's `lora` section ({} when the role trains all its parameters)."""
  check_role(config, role, 'model role')
  return dict(config.models[role].to_dict().get(LORA_KEY) or {})


@functools.lru_cache(maxsize=16)
def _hf_section_json(folder: str) -> str:
  from kuaijax.hf import model_io

  return json.dumps(model_io.model_section(folder))


def _hf_section(folder: str) -> dict:
  return json.loads(_hf_section_json(folder))


def role_config(config, role: str):
  """`config` with `model` = the role's section, `model_lora` = its LoRA section, `init_from_hf` = its
  folder (if imported) and no `init_from`: the form the trainer and `param_layout` read."""
  out = ml_collections.ConfigDict(config.to_dict())
  with out.unlocked():
    out.model = model_section(config, role)
    out.model_lora = lora_section(config, role)
    out.init_from = ''
    out.init_from_hf = hf_folder(config, role)
  return out


def layout(config, role: str):
  """The trainer's `ParamLayout` (graphdef, abstract params, shardings, mesh) of the role."""
  return param_layout(role_config(config, role), lm_task.model_factory(model_section(config, role)))


def load(config, source: ParamsSource):
  """(graphdef, params) of `source`, placed on the configured mesh."""
  lay = layout(config, source.role)
  if source.params_format == 'hf':
    from kuaijax.hf import model_io
    from kuaijax.models.transformer import TransformerConfig

    cfg = TransformerConfig.from_config(model_section(config, source.role))
    params = model_io.load_for_config(source.path, cfg, lay.abstract_params, lay.shardings)
    adapter = config.models[source.role].get(PEFT_KEY, '')
    if adapter and source.path == hf_folder(config, source.role):
      params = _with_adapter(lay, params, adapter)
  else:
    params, _ = ckpt_lib.load_params(source.path, lay.abstract_params, lay.shardings)
  return lay.graphdef, params


def _with_adapter(lay, params, folder: str) -> dict:
  """`params` with the PEFT adapter in `folder` merged in, on the same shardings."""
  from kuaijax.hf import peft_io

  with parallel.axis_rules(lay.mesh, lay.rules):
    model = lora.merge(peft_io.load_adapter(nnx.merge(lay.graphdef, params), folder))
  return jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), lay.shardings)


def vocab_sizes(config) -> dict[str, int]:
  """Each role's vocabulary size (the tokenizer must fit every one)."""
  return {role: int(model_section(config, role).vocab_size) for role in config.models}
