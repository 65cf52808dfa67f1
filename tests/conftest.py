"""Test-session setup: 8 simulated CPU devices, a private tfds data_dir, tiny configs."""

import os

# Multi-device code is tested on 8 simulated CPU devices; must be set before jax is imported. A
# device count already set (a process of `kuaijax.launch` importing test helpers) is kept.
_FLAG = '--xla_force_host_platform_device_count'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' {_FLAG}=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: longer end-to-end runs (deselect with -m "not slow")')
  config.addinivalue_line('markers', 'gpu: needs a GPU; skipped on CPU')


@pytest.fixture(scope='session', autouse=True)
def _data_dir_env(tmp_path_factory):
  """A data_dir shared by the session (embedded data sets build into it on first use)."""
  if 'KUAIJAX_DATA_DIR' not in os.environ:
    os.environ['KUAIJAX_DATA_DIR'] = str(tmp_path_factory.mktemp('kuaijax_data'))
  yield


def tiny_lm_pipeline_config(**train_overrides):
  """The runlocal LM pipeline (configs/lm/mixture.py: stage 'lm' trains role 'policy') shrunk to a
  seconds-long run on one device."""
  from kuaijax.config_lib import load_config

  config = load_config(os.path.join(REPO_ROOT, 'configs/lm/mixture.py') + ':runlocal')
  config.parallel.num_devices = 1
  config.data.update(seq_len=128, eval_batch_size=16, eval_batches=4)
  config.models.policy.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64)
  config.train.update(
    steps=8,
    batch_size=4,
    log_every=2,
    eval_every=4,
    checkpoint_every=4,
    progress=False,
    async_checkpoint=False,
  )
  config.train.update(train_overrides)
  config.optimizer.warmup_steps = 2
  config.eval.unigram_max_examples = 200
  return config


def tiny_lm_config(**train_overrides):
  """`tiny_lm_pipeline_config` as the trainer reads it: `model` = the policy role's section."""
  from kuaijax.stages.roles import role_config

  config = role_config(tiny_lm_pipeline_config(**train_overrides), 'policy')
  config.lock()
  return config
