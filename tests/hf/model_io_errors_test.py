"""HF import/export without torch: exact round trips (single file, sharded with an index, onto a
mesh) and bad-input errors that name the file and tensor."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from kuaijax import parallel
from kuaijax.hf import families, model_io
from kuaijax.hf.safetensors_io import Checkpoint, write_file
from kuaijax.models.transformer import Transformer, TransformerConfig

CONFIG = dict(
  vocab_size=96,
  d_model=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  d_ff=64,
  qkv_bias=True,
  tie_embeddings=False,
)
MOE = dict(
  mlp='moe_gated_shared',
  mlp_options=dict(
    num_experts=4,
    routing='top_k',
    k=2,
    renormalize=False,
    expert_d_ff=16,
    shared_d_ff=24,
    first_dense_layers=1,
    expert_frequency=1,
  ),
)


def random_model(cfg: TransformerConfig, seed: int = 0) -> Transformer:
  """A model with N(0, 0.05^2) params drawn in numpy (eager NNX init compiles op by op: slow)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  pure = jax.tree.map(
    lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), nnx.to_pure_dict(state)
  )
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(folder, params) of a random Qwen2-MoE-shaped kuaijax model saved in 3+ shards."""
  model = random_model(TransformerConfig(**CONFIG, **MOE))
  folder = str(tmp_path_factory.mktemp('qwen2_moe'))
  assert model_io.save_model(model, folder, max_shard_bytes=40_000) == 'qwen2_moe'
  return folder, _params(model)


def test_sharded_round_trip_is_exact(exported):
  folder, params = exported
  index = json.loads(pathlib.Path(folder, 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) >= 3
  loaded = _params(model_io.load_model(folder))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_loads_onto_mesh_with_logical_shardings(exported):
  folder, params = exported
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 2, 'expert': 2})
  model = model_io.load_model(folder, mesh=mesh)
  wq = model.layers[0].attn.wq[...]
  assert wq.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor', None)
  w1 = model.layers[1].mlp.moe.w1[...]
  assert w1.sharding.spec == jax.sharding.PartitionSpec('expert', 'fsdp', 'tensor')
  assert w1.addressable_shards[0].data.shape == (2, 16, 8)
  jax.tree.map(np.testing.assert_array_equal, _params(model), params)


def test_config_translation_round_trips():
  cfg = TransformerConfig(**CONFIG, **MOE, rope_llama3_scaling=(8.0, 1.0, 4.0, 64))
  hf = families.hf_config({**cfg.__dict__, 'mlp_options': dict(cfg.mlp_kwargs)})
  back = TransformerConfig(**families.model_config(hf))
  assert back == cfg


def _rewrite(folder, src, change):
  """Copies the single-file export `src` into `folder` with `change(tensors)` applied."""
  ckpt = Checkpoint(src)
  tensors = {name: ckpt.read(name) for name in ckpt.tensors}
  ckpt.close()
  change(tensors)
  os.makedirs(folder, exist_ok=True)
  write_file(os.path.join(folder, 'model.safetensors'), tensors)
  with open(os.path.join(src, 'config.json')) as f, open(f'{folder}/config.json', 'w') as g:
    g.write(f.read())
  return folder


@pytest.fixture(scope='module')
def single(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('llama'))
  model = random_model(TransformerConfig(**{**CONFIG, 'qkv_bias': False}), seed=1)
  model_io.save_model(model, folder)
  return folder


Q = 'model.layers.1.self_attn.q_proj.weight'


@pytest.mark.parametrize(
  'change, message',
  [
    (lambda t: t.pop(Q), f"tensor '{Q}' is missing"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)), "unexpected tensors ['extra']"),
    (lambda t: t.update({Q: t[Q][:, :8]}), f"tensor '{Q}' has shape (32, 8)"),
  ],
)
def test_bad_tensors_are_named(single, tmp_path, change, message):
  folder = _rewrite(str(tmp_path / 'bad'), single, change)
  with pytest.raises(ValueError, match='model.safetensors|bad') as e:
    model_io.load_model(folder)
  assert message in str(e.value)


def test_truncated_file_and_missing_shard(single, exported, tmp_path):
  folder = _rewrite(str(tmp_path / 'cut'), single, lambda t: None)
  path = os.path.join(folder, 'model.safetensors')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 4)
  with pytest.raises(ValueError, match=r'model.safetensors: truncated .*tensor'):
    model_io.load_model(folder)
  shards, _ = exported
  broken = tmp_path / 'shards'
  broken.mkdir()
  for name in os.listdir(shards):
    if not name.startswith('model-00002'):
      (broken / name).write_bytes(pathlib.Path(shards, name).read_bytes())
  with pytest.raises(FileNotFoundError, match='index.json points to a missing shard model-00002'):
    model_io.load_model(str(broken))


@pytest.mark.parametrize(
  'edit, message',
  [
    (dict(model_type='gpt2'), "model_type='gpt2' is not one of"),
    (dict(rope_parameters=dict(rope_type='longrope', factor=4.0)), "rope_type='longrope'"),
    (dict(rope_parameters=dict(rope_type='yarn', factor=4.0)), 'yarn lacks original_max'),
    (dict(attention_bias=True), 'attention_bias=True'),
    (dict(hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(quantization_config={}), "fields ['quantization_config']"),
  ],
)
def test_unsupported_config_fields_are_named(single, tmp_path, edit, message):
  hf = json.loads(pathlib.Path(single, 'config.json').read_text())
  hf.update(edit)
  (tmp_path / 'config.json').write_text(json.dumps(hf))
  with pytest.raises(ValueError, match='config.json') as e:
    model_io.model_config(str(tmp_path))
  assert message in str(e.value)


def test_qwen2_sliding_window_is_an_error():
  hf = dict(model_type='qwen2', vocab_size=8, hidden_size=8, intermediate_size=8)
  hf.update(num_hidden_layers=1, num_attention_heads=2, use_sliding_window=True)
  with pytest.raises(ValueError, match='use_sliding_window=True'):
    families.model_config(hf)


def test_folder_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match='no config.json'):
    model_io.load_model(str(tmp_path))
