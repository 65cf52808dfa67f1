"""PEFT LoRA adapters <-> kuaijax LoRA adapters (`kuaijax.models.lora`).

A PEFT adapter folder holds `adapter_config.json` (`r`, `lora_alpha`, `use_rslora`,
`target_modules`, ...) and `adapter_model.safetensors` with, per adapted module,
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]; the update is
scale * B A with scale = lora_alpha / r (/ sqrt(r) with rsLoRA), the semantics of
`LoRAConfig`. The module of each kuaijax weight is the one `model_io.layout_of` reads it from
(`wq` <- `self_attn.q_proj`, dense and shared-expert SwiGLUs <- `gate_proj` / `up_proj` /
`down_proj`, the untied head <- `lm_head`), so the families kuaijax imports are covered.
Routed experts are not: PEFT adapts them as nested `target_parameters` wrappers of transformers'
fused expert tensors, a layout kuaijax neither reads nor writes (an error names it).
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
from flax import nnx

from kuaijax.hf import families, model_io
from kuaijax.hf.safetensors_io import Checkpoint, write_file
from kuaijax.models import lora

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
# adapter_config.json fields that must keep these values (anything else changes the function).
REQUIRED = {
  'peft_type': 'LORA',
  'bias': 'none',
  'use_dora': False,
  'fan_in_fan_out': False,
  'rank_pattern': {},
  'alpha_pattern': {},
  'modules_to_save': None,
  'target_parameters': None,
  'layers_to_transform': None,
}


def _family(model) -> str:
  fields = dict(vars(model.config))
  fields['mlp_options'] = dict(model.config.mlp_kwargs)
  return families.infer_family(fields)


def hf_modules(model, family: str) -> dict[str, str]:
  """Dotted kuaijax weight path -> the HF module PEFT adapts, for every linear weight that has one
  (routed experts have none)."""
  num_experts = dict(model.config.mlp_kwargs).get('num_experts', 0)
  out = {}
  for path, (module, name, _) in lora.linear_weights(model).items():
    keys = tuple(int(k) if k.isdigit() else k for k in path.split('.'))
    layout = model_io.layout_of(keys, getattr(module, name).ndim, family, num_experts)
    if not layout.stacked:
      out[path] = layout.names[0].removesuffix('.weight')
  return out


def read_config(folder: str) -> dict:
  """The adapter's config, checked: a plain LoRA adapter (no DoRA, bias, per-module ranks...)."""
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)')
  with open(path) as f:
    config = json.load(f)
  for key, value in REQUIRED.items():
    if key in config and (config[key] or None) != (value or None):
      raise ValueError(f'{path}: {key}={config[key]!r} is not supported (needs {value!r})')
  return config


def load_adapter(model, folder: str):
  """Attaches the PEFT adapter in `folder` to `model` (a kuaijax Transformer, in place; returns it).

  Errors name the problem: an adapter written for another architecture, a tensor whose module the
  model lacks (or a routed-expert adapter), or shapes that do not fit.
  """
  config = read_config(folder)
  family = _family(model)
  base_class = (config.get('auto_mapping') or {}).get('base_model_class')
  if base_class and base_class != families.ARCHITECTURES[family]:
    raise ValueError(
      f'{folder}: the adapter was made for {base_class}, the model is {families.ARCHITECTURES[family]}'
    )
  weights = os.path.join(folder, WEIGHTS_FILE)
  ckpt = Checkpoint(folder, WEIGHTS_FILE)
  paths = {module: path for path, module in hf_modules(model, family).items()}
  pairs: dict[str, dict[str, str]] = {}
  for name in ckpt.tensors:
    if name.endswith('.base_layer.weight'):
      continue  # the base weight peft also stores for a targeted lm_head: the model has it
    match = re.fullmatch(re.escape(PREFIX) + r'(.+)\.lora_([AB])\.weight', name)
    if not match or match[1] not in paths:
      raise ValueError(
        f'{weights}: tensor {name!r} adapts no linear weight kuaijax has for {family} (it '
        'adapts attention, dense and shared-expert SwiGLUs and an untied lm_head; not routed experts)'
      )
    pairs.setdefault(paths[match[1]], {})[match[2]] = name
  for names in pairs.values():
    if set(names) != {'A', 'B'}:
      raise ValueError(f'{weights}: {sorted(names.values())} lacks its lora_A / lora_B partner')
  cfg = lora.LoRAConfig(
    rank=int(config['r']),
    alpha=float(config['lora_alpha']),
    dropout=float(config.get('lora_dropout') or 0.0),
    targets=tuple(re.escape(p) for p in pairs),
    rslora=bool(config.get('use_rslora')),
  )
  lora.apply(model, cfg, rngs=nnx.Rngs(0))
  adapters = lora.adapters(model)
  for path, names in pairs.items():
    adapter = adapters[path]
    a, b = (ckpt.read(names[side]).astype(np.float32) for side in 'AB')
    want_a = (cfg.rank, int(np.prod(adapter.a.shape[:-1])))
    want_b = (int(np.prod(adapter.b.shape[1:])), cfg.rank)
    if a.shape != want_a or b.shape != want_b:
      raise ValueError(
        f'{weights}: {names["A"]} / lora_B have shapes {a.shape} / {b.shape}, the model needs '
        f'{want_a} / {want_b} (an adapter for another model size?)'
      )
    adapter.a[...] = a.T.reshape(adapter.a.shape)
    adapter.b[...] = b.T.reshape(adapter.b.shape)
  ckpt.close()
  return model


def save_adapter(model, cfg: lora.LoRAConfig, folder: str, *, family: str | None = None) -> str:
  """Writes the model's adapters as a PEFT adapter folder; returns the family (base class)."""
  family = family or _family(model)
  modules = hf_modules(model, family)
  tensors, targets = {}, []
  for path, adapter in lora.adapters(model).items():
    if path not in modules:
      raise ValueError(f'{path}: routed-expert adapters have no PEFT layout kuaijax writes')
    a = np.asarray(jax.device_get(adapter.a[...]), np.float32)
    b = np.asarray(jax.device_get(adapter.b[...]), np.float32)
    prefix = PREFIX + modules[path]
    tensors[prefix + '.lora_A.weight'] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
    tensors[prefix + '.lora_B.weight'] = np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
    targets.append(modules[path])
  os.makedirs(folder, exist_ok=True)
  write_file(os.path.join(folder, WEIGHTS_FILE), tensors, {'format': 'pt'})
  config = {
    **REQUIRED,
    'task_type': 'CAUSAL_LM',
    'base_model_name_or_path': None,
    'auto_mapping': {'base_model_class': families.ARCHITECTURES[family]},
    'r': cfg.rank,
    'lora_alpha': cfg.alpha,
    'lora_dropout': cfg.dropout,
    'use_rslora': cfg.rslora,
    'target_modules': sorted(targets),
    'init_lora_weights': True,
    'inference_mode': True,
  }
  with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=2)
  return family
