"""`config.init_from_hf`: the trainer's fresh-run params come from a Hugging Face folder."""

import jax
import ml_collections
import numpy as np
import pytest

from kuaijax.config_lib import trainer_config
from kuaijax.hf import model_io
from kuaijax.models.transformer import TransformerConfig
from kuaijax.train import lm_task
from kuaijax.train.trainer import initial_params, param_layout, train
from tests.conftest import tiny_lm_config
from tests.hf.model_io_errors_test import _params, random_model

MODEL = dict(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
MOE = dict(
  qk_norm=True,
  mlp='moe',
  mlp_options=dict(num_experts=4, routing='top_k', k=2, renormalize=True, expert_d_ff=16),
)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('qwen3_moe'))
  model = random_model(TransformerConfig(**MODEL, **MOE), seed=5)
  model_io.save_model(model, out)
  return out, _params(model)


def _config(path, **model_changes):
  config = trainer_config()
  config.model = ml_collections.ConfigDict(model_io.model_section(path))
  config.init_from_hf = path
  config.parallel.num_devices = 2
  for key, value in model_changes.items():
    if key == 'mlp_options':
      config.model.mlp_options.update(value)
    else:
      config.model[key] = value
  return config


def test_initial_params_come_from_the_folder(folder):
  path, params = folder
  # Continued training of the pretrained top-2 MoE with dynamic Top-P routing is allowed.
  config = _config(path, mlp_options=dict(routing='top_p', p=0.5, k_max=4))
  layout = param_layout(config, lm_task.model_factory(config.model))
  loaded = initial_params(config, layout.abstract_params, layout.shardings, None)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)


@pytest.mark.parametrize(
  'change, message',
  [
    (dict(norm_eps=1e-5), 'model.norm_eps=1e-05 but the checkpoint has 1e-06'),
    (dict(mlp_options=dict(expert_d_ff=8)), 'model.mlp_options.expert_d_ff=8'),
  ],
)
def test_mismatched_model_section_is_named(folder, change, message):
  path, _ = folder
  config = _config(path, **change)
  layout = param_layout(config, lm_task.model_factory(config.model))
  with pytest.raises(ValueError, match='init_from_hf') as e:
    initial_params(config, layout.abstract_params, layout.shardings, None)
  assert message in str(e.value)


@pytest.mark.slow
def test_lm_training_starts_from_the_folder(folder, tmp_path):
  """One step whose learning rate is 0 (warm-up) keeps exactly the imported weights."""
  path, params = folder
  config = tiny_lm_config(steps=1)
  config.model = ml_collections.ConfigDict(model_io.model_section(path))
  config.init_from_hf = path
  data = lm_task.build_lm_data(config, str(tmp_path))
  result = train(
    config,
    str(tmp_path),
    model_factory=lm_task.model_factory(config.model),
    loss_fn=lm_task.lm_loss_fn(config.train.z_loss),
    train_dataset=data.train_dataset,
  )
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.params), params)
