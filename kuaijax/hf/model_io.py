"""Import a Hugging Face model folder as a kuaijax `Transformer`, and export one back.

`load_model(folder)` reads `config.json` (kuaijax/hf/families.py maps it to a `TransformerConfig`),
builds the abstract model, and fills every parameter with `jax.make_array_from_callback`: each device
reads only its own region of the HF tensor from the memory-mapped safetensors files (rows range of
the stored [out, in] matrix, then transposed and reshaped to the kuaijax layout), so a model larger
than one device loads straight onto a mesh with the config's logical shardings and no full host copy.
Parameters load on up to 4 threads.
Every tensor name, shape and file is checked before anything is read; errors name the file and
tensor. `save_model(model, folder)` writes config.json and (sharded) safetensors that transformers
loads.

Layouts: HF linear weights are [out, in]; kuaijax keeps [in, out] with the head axes split
(wq [d, H, hd], wo [H, hd, d]), stacked experts [E, d, f] / [E, f, d], the router [d, E] (float32).
RoPE uses the same rotate-half convention on both sides, so no permutation of q/k rows is needed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from kuaijax import parallel
from kuaijax.hf import families
from kuaijax.hf.safetensors_io import Checkpoint, write_file
from kuaijax.models.transformer import DTYPES, Transformer, TransformerConfig

CONFIG_FILE = 'config.json'
# Tensors some checkpoints carry that the function does not depend on (recomputed from config).
IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a kuaijax array K is built from HF tensor(s) W: K = reshape(transpose(W, perm)).

  groups[g] = how many K dims the permuted W axis g splits into (wq: W [H*hd, d], perm (1, 0),
  groups (1, 2) -> K [d, H, hd]). With several names (experts), K stacks them on a new axis 0.
  """

  names: tuple[str, ...]
  perm: tuple[int, ...]
  groups: tuple[int, ...]
  stacked: bool = False


def _linear(name, groups=(1, 1)) -> Layout:
  return Layout((name,), (1, 0), groups)


def _copy(name, groups=(1,)) -> Layout:
  return Layout((name,), tuple(range(len(groups))), groups)


def _experts(pattern: str, num: int) -> Layout:
  return Layout(tuple(pattern.format(e) for e in range(num)), (1, 0), (1, 1), stacked=True)


def layout_of(path: tuple, ndim: int, family: str, num_experts: int) -> Layout:
  """The HF source of the kuaijax parameter at `path` (a pure-dict key path) with `ndim` dims."""
  if path == ('embed', 'embedding'):
    return Layout(('model.embed_tokens.weight',), (0, 1), (1, 1))
  if path == ('head',):
    return _linear('lm_head.weight')
  if path == ('final_norm', 'scale'):
    return _copy('model.norm.weight')
  if path[0] != 'layers':
    raise ValueError(f'parameter {path} has no HF counterpart')
  p, rest = f'model.layers.{path[1]}.', path[2:]
  attn = {
    ('attn', 'wq'): _linear(p + 'self_attn.q_proj.weight', (1, 2)),
    ('attn', 'wk'): _linear(p + 'self_attn.k_proj.weight', (1, 2)),
    ('attn', 'wv'): _linear(p + 'self_attn.v_proj.weight', (1, 2)),
    ('attn', 'wo'): _linear(p + 'self_attn.o_proj.weight', (2, 1)),
    ('attn', 'bq'): _copy(p + 'self_attn.q_proj.bias', (2,)),
    ('attn', 'bk'): _copy(p + 'self_attn.k_proj.bias', (2,)),
    ('attn', 'bv'): _copy(p + 'self_attn.v_proj.bias', (2,)),
    ('attn', 'q_norm', 'scale'): _copy(p + 'self_attn.q_norm.weight'),
    ('attn', 'k_norm', 'scale'): _copy(p + 'self_attn.k_norm.weight'),
    ('attn_norm', 'scale'): _copy(p + 'input_layernorm.weight'),
    ('mlp_norm', 'scale'): _copy(p + 'post_attention_layernorm.weight'),
  }
  if rest in attn:
    return attn[rest]
  mixtral = family == 'mixtral'
  moe = p + ('block_sparse_moe.' if mixtral else 'mlp.')
  names = ('w1', 'w3', 'w2') if mixtral else ('gate_proj', 'up_proj', 'down_proj')
  table = {
    ('mlp', 'gate'): _linear(p + 'mlp.shared_expert_gate.weight'),
    ('mlp', 'router'): _linear(moe + 'gate.weight'),
    ('mlp', 'moe', 'router'): _linear(moe + 'gate.weight'),
  }
  for ours, theirs in zip(('w1', 'w3', 'w2'), ('gate_proj', 'up_proj', 'down_proj'), strict=True):
    table[('mlp', ours)] = _linear(p + f'mlp.{theirs}.weight')  # dense SwiGLU
    table[('mlp', 'shared', ours)] = _linear(p + f'mlp.shared_expert.{theirs}.weight')
  for ours, theirs in zip(('w1', 'w3', 'w2'), names, strict=True):
    experts = _experts(moe + 'experts.{}.' + theirs + '.weight', num_experts)
    table[('mlp', 'moe', ours)] = experts
    if ndim == 3:  # the stacked experts of an MoE layer (a dense layer's SwiGLU is 2-D)
      table[('mlp', ours)] = experts
  if rest not in table:
    raise ValueError(f'parameter {path} has no HF counterpart in {family}')
  return table[rest]


def _flat(tree) -> dict[tuple, object]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[tuple(getattr(k, 'key', getattr(k, 'idx', k)) for k in path)] = leaf
  return out


def _layouts(abstract_params, family: str, num_experts: int) -> dict[tuple, Layout]:
  return {
    path: layout_of(path, len(leaf.shape), family, num_experts)
    for path, leaf in _flat(abstract_params).items()
  }


def _hf_shape(layout: Layout, kshape) -> tuple[int, ...]:
  """The HF tensor shape that `layout` turns into a kuaijax array of shape `kshape`."""
  kshape = tuple(kshape[1:] if layout.stacked else kshape)
  sizes, i = [], 0
  for g in layout.groups:
    sizes.append(math.prod(kshape[i : i + g]))
    i += g
  shape = [0] * len(sizes)
  for g, axis in enumerate(layout.perm):
    shape[axis] = sizes[g]
  return tuple(shape)


def _read(ckpt: Checkpoint, name: str, layout: Layout, kshape, index) -> np.ndarray:
  """The region `index` (slices) of the kuaijax array built from HF tensor `name`."""
  index = [slice(*s.indices(n)) for s, n in zip(index, kshape, strict=True)]
  dims, ranges, rest, i = [], [None] * len(layout.perm), [], 0
  for g, size in enumerate(layout.groups):
    group = kshape[i : i + size]
    stride = math.prod(group[1:])
    first = index[i]
    ranges[layout.perm[g]] = (first.start * stride, first.stop * stride)
    dims += [first.stop - first.start, *group[1:]]
    rest += [slice(None), *index[i + 1 : i + size]]
    i += size
  arr = ckpt.read(name, slice(*ranges[0]))
  arr = arr[(slice(None), *(slice(*r) for r in ranges[1:]))]
  return arr.transpose(layout.perm).reshape(dims)[tuple(rest)]


def _check(ckpt: Checkpoint, layouts: Mapping[tuple, Layout], flat_abstract, tied: bool) -> None:
  """All names present with the right shapes, and no tensor left unused."""
  used = set()
  for path, layout in layouts.items():
    want = _hf_shape(layout, flat_abstract[path].shape)
    for name in layout.names:
      used.add(name)
      if name not in ckpt.tensors:
        raise ValueError(f'{ckpt.folder}: tensor {name!r} is missing (needed for {path})')
      info = ckpt.tensors[name]
      if info.shape != want:
        raise ValueError(
          f'{info.path}: tensor {name!r} has shape {info.shape}, the config needs {want}'
        )
  extra = sorted(
    n
    for n in set(ckpt.tensors) - used
    if not n.endswith(IGNORED_SUFFIXES) and not (tied and n == 'lm_head.weight')
  )
  if extra:
    raise ValueError(f'{ckpt.folder}: unexpected tensors {extra[:8]} ({len(extra)} in all)')


def read_config(folder: str) -> dict:
  """The folder's config.json as a dict (errors name the file)."""
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{folder}: no {CONFIG_FILE} (not a Hugging Face model folder)')
  try:
    with open(path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(hf, dict):
    raise ValueError(f'{path}: not a JSON object')
  return hf


def _merge(base: dict, overrides: Mapping | None) -> dict:
  out = dict(base)
  for key, value in dict(overrides or {}).items():
    if key == 'mlp_options':
      out[key] = {**dict(out.get(key) or {}), **dict(value)}
    else:
      out[key] = value
  return out


def model_config(folder: str, *, dtype: str | None = None, overrides: Mapping | None = None):
  """(TransformerConfig, HF family) of a HF folder.

  dtype: parameter and compute dtype (None: float32); `overrides` replace model fields, with
  `mlp_options` merged key by key (e.g. {'mlp_options': {'routing': 'top_p', 'p': 0.6}}).
  """
  hf = read_config(folder)
  where = os.path.join(folder, CONFIG_FILE)
  fields = families.model_config(hf, where=where, dtype=dtype or 'float32')
  return TransformerConfig(**_merge(fields, overrides)), hf['model_type']


def load_hf_params(folder: str, cfg: TransformerConfig, family: str, abstract_params, shardings):
  """Pure-dict params for `abstract_params` placed with `shardings`, read from the folder."""
  ckpt = Checkpoint(folder)
  try:
    num_experts = dict(cfg.mlp_kwargs).get('num_experts', 0)
    layouts = _layouts(abstract_params, family, num_experts)
    flat_abstract = _flat(abstract_params)
    _check(ckpt, layouts, flat_abstract, cfg.tie_embeddings)
    flat_shardings = _flat(shardings)

    def build(path):
      layout, leaf = layouts[path], flat_abstract[path]

      def region(index):
        if layout.stacked:
          experts = range(*index[0].indices(leaf.shape[0]))
          parts = [_read(ckpt, layout.names[e], layout, leaf.shape[1:], index[1:]) for e in experts]
          return np.stack(parts).astype(leaf.dtype, copy=False)
        value = _read(ckpt, layout.names[0], layout, leaf.shape, index)
        return value.astype(leaf.dtype, copy=False)

      return jax.make_array_from_callback(leaf.shape, flat_shardings[path], region)

    # numpy copies and device transfers release the GIL: parameters load in parallel.
    with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
      values = dict(zip(flat_abstract, pool.map(build, flat_abstract)))
  finally:
    ckpt.close()
  return jax.tree_util.tree_map_with_path(
    lambda p, _: values[tuple(getattr(k, 'key', getattr(k, 'idx', k)) for k in p)], abstract_params
  )


def model_section(folder: str, *, dtype: str = 'float32') -> dict:
  """The `config.model` section (TransformerConfig fields) of a HF folder, for experiment configs
  that start from `init_from_hf` (MoE routing options may then be changed, e.g. to 'top_p')."""
  return families.model_config(
    read_config(folder), where=os.path.join(folder, CONFIG_FILE), dtype=dtype
  )


# MoE options that only change how experts are picked, not which weights exist.
ROUTING_OPTIONS = ('routing', 'p', 'k', 'k_max', 'renormalize', 'dispatch', 'capacity_factor')


def load_for_config(folder: str, cfg: TransformerConfig, abstract_params, shardings):
  """Params of a HF folder for a run whose model config is `cfg` (the trainer's init_from_hf).

  Every function-defining field of `cfg` must equal the folder's (dtypes and the MoE routing
  options may differ, so a pretrained top-k MoE can continue training with Top-P routing).
  """
  hf = model_section(folder)
  ours = dataclasses.asdict(cfg)
  ours['mlp_options'] = dict(cfg.mlp_kwargs)
  for key, value in hf.items():
    if key in ('dtype', 'param_dtype'):
      continue
    if key == 'mlp_options':
      for name, v in value.items():
        if name not in ROUTING_OPTIONS and ours['mlp_options'].get(name) != v:
          raise ValueError(
            f'init_from_hf={folder!r}: model.mlp_options.{name}='
            f'{ours["mlp_options"].get(name)!r} but the checkpoint has {v!r}'
          )
    elif ours.get(key) != value:
      raise ValueError(
        f'init_from_hf={folder!r}: model.{key}={ours.get(key)!r} but the checkpoint has {value!r}'
      )
  family = read_config(folder)['model_type']
  return load_hf_params(folder, cfg, family, abstract_params, shardings)


def load_model(
  folder: str,
  *,
  dtype: str | None = None,
  overrides: Mapping | None = None,
  mesh: jax.sharding.Mesh | None = None,
  rules=None,
) -> Transformer:
  """A kuaijax `Transformer` with the weights of a HF folder (see the module docstring).

  With `mesh` (and logical `rules`, default `parallel.DEFAULT_RULES`), parameters are sharded by
  their logical axes; without, they land on this process's first device.
  """
  cfg, family = model_config(folder, dtype=dtype, overrides=overrides)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  abstract_params = nnx.to_pure_dict(state)
  if mesh is None:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, abstract_params)
  else:
    shardings = parallel.state_shardings(
      abstract_params,
      parallel.logical_axes_tree(state),
      mesh,
      parallel.DEFAULT_RULES if rules is None else rules,
    )
  params = load_hf_params(folder, cfg, family, abstract_params, shardings)
  return nnx.merge(graphdef, params)


def _to_hf(layout: Layout, value: np.ndarray) -> list[np.ndarray]:
  """Inverse of the layout: the HF tensor(s) of a kuaijax array."""
  parts = list(value) if layout.stacked else [value]
  out = []
  for part in parts:
    permuted = _hf_shape(
      Layout(layout.names, tuple(range(len(layout.perm))), layout.groups), part.shape
    )
    out.append(np.ascontiguousarray(part.reshape(permuted).transpose(np.argsort(layout.perm))))
  return out


def hf_tensors(params, family: str, num_experts: int = 0, *, dtype=None) -> dict[str, np.ndarray]:
  """HF tensor name -> numpy array of a kuaijax pure-dict param tree (host copies)."""
  layouts = _layouts(params, family, num_experts)
  tensors = {}
  for path, leaf in _flat(params).items():
    value = np.asarray(jax.device_get(leaf))
    value = value if dtype is None else value.astype(dtype)
    tensors.update(zip(layouts[path].names, _to_hf(layouts[path], value), strict=True))
  return tensors


def save_model(
  model: Transformer,
  folder: str,
  *,
  family: str | None = None,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 2**30,
) -> str:
  """Writes config.json and safetensors (sharded with an index above `max_shard_bytes`).

  family: the HF model_type (None: inferred from the config, see `families.infer_family`);
  dtype: the stored dtype (None: the model's parameter dtype). Returns the family written.
  """
  cfg = model.config
  fields = dataclasses.asdict(cfg)
  fields['mlp_options'] = dict(cfg.mlp_kwargs)
  family = family or families.infer_family(fields)
  dtype = dtype or cfg.param_dtype
  hf = families.hf_config(fields, family, dtype=dtype)
  params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
  num_experts = dict(cfg.mlp_kwargs).get('num_experts', 0)
  tensors = hf_tensors(params, family, num_experts, dtype=DTYPES[dtype])
  os.makedirs(folder, exist_ok=True)
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    if current and size + tensors[name].nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += tensors[name].nbytes
  shards.append(current)
  metadata = {'format': 'pt'}
  if len(shards) == 1:
    write_file(os.path.join(folder, 'model.safetensors'), shards[0], metadata)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
      write_file(os.path.join(folder, file), shard, metadata)
      weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
    json.dump(hf, f, indent=2)
  return family
