"""The trainer with LoRA adapters: only the adapters train and are checkpointed (optimizer state
included), the base stays frozen (bfloat16 too), a resumed run equals an uninterrupted one, and
`init_from` supplies the base."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np

from kuaijax.models import lora
from kuaijax.stages.roles import role_config
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train import lm_task
from kuaijax.train.trainer import train, train_program
from tests.conftest import tiny_lm_pipeline_config
from tests.train.trainer_test import assert_trees_equal, dataset, loss_fn

LORA = dict(rank=4, alpha=8.0, targets=('wq', 'wv', 'w2'))


def lora_config(lora_section=LORA, **train_overrides):
  pipeline = tiny_lm_pipeline_config(**train_overrides)
  with pipeline.unlocked():
    pipeline.models.policy.lora = dict(lora_section)
  config = role_config(pipeline, 'policy')
  config.lock()
  return config


def run(workdir, config):
  return train(
    config,
    str(workdir),
    model_factory=lm_task.model_factory(config.model, config.model_lora),
    loss_fn=loss_fn,
    train_dataset=dataset(config.train.batch_size),
  )


def initial(config):
  program = train_program(config, lm_task.model_factory(config.model, config.model_lora), loss_fn)
  return jax.jit(program.init_params)()  # as the trainer computes it


def test_only_adapters_train_and_are_checkpointed(tmp_path):
  config = lora_config(steps=4, checkpoint_every=4)
  result = run(tmp_path, config)
  start_adapters, start_base = lora.split_params(initial(config))
  adapters, base = lora.split_params(result.params)
  assert_trees_equal(base, start_base)  # frozen
  changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), adapters, start_adapters)
  assert min(jax.tree.leaves(changed)) > 0
  assert len(jax.tree.leaves(adapters)) == 2 * 3 * 2  # (A, B) x 3 targets x 2 layers
  saved = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), keep=1, save_every=1).restore(4)
  paths = lambda tree: {tuple(str(k.key) for k in p) for p, _ in jax.tree.leaves_with_path(tree)}
  assert paths(saved['params']) == paths(adapters)  # (integer keys come back as strings)
  moments = [x for x in jax.tree.leaves(saved['opt_state']) if np.ndim(x) >= 2]
  assert sorted(x.shape for x in moments) == sorted(
    2 * [x.shape for x in jax.tree.leaves(adapters)]
  )


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  config = lora_config(dict(LORA, dropout=0.1), steps=4, checkpoint_every=2, keep_checkpoints=3)
  straight = run(tmp_path / 'a', config)
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '4')
  resumed = run(tmp_path / 'b', config)
  assert [r['step'] for r in resumed.history] == [4]
  assert_trees_equal(straight.params, resumed.params)


def test_bfloat16_base_with_float32_adapters(tmp_path):
  config = lora_config(steps=2)
  with config.unlocked():
    config.model.param_dtype = 'bfloat16'
  result = run(tmp_path, config)
  adapters, base = lora.split_params(result.params)
  assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}


def test_init_from_supplies_the_base(tmp_path):
  plain = tiny_lm_pipeline_config(steps=2)
  first = run(tmp_path / 'plain', role_config(plain, 'policy'))
  config = lora_config(steps=2)
  with config.unlocked():
    config.init_from = str(tmp_path / 'plain')
  result = run(tmp_path / 'lora', config)
  assert_trees_equal(lora.split_params(result.params)[1], first.params)
  # The merged plain model a LoRA stage hands on, written and read back as plain params.
  merged = lora.merged_params(result.graphdef, result.params)
  ckpt_lib.save_params(str(tmp_path / 'merged'), merged, result.step)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), first.params)
  shardings = jax.tree.map(lambda x: x.sharding, first.params)
  loaded, step = ckpt_lib.load_params(str(tmp_path / 'merged'), abstract, shardings)
  assert step == 2
  assert_trees_equal(loaded, merged)
