"""Checkpoints written on one mesh restore onto another: full state (resume) and params only.

Saved on (data 2, fsdp 2, tensor 2); restored onto 1 device and onto (fsdp 4, expert 2). A resumed
run must continue with the losses and parameters of the uninterrupted run on the original mesh.
(Restoring onto 2 processes is in tests/launch_test.py.)
"""

import shutil

import jax
import numpy as np
import pytest

from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train import lm_task
from kuaijax.train.metrics import read_metrics
from kuaijax.train.trainer import param_layout
from tests.conftest import tiny_lm_config
from tests.train.trainer_test import run

SAVED_ON = dict(data=2, fsdp=2, tensor=2, expert=1)
TARGETS = {
  'one_device': (1, dict(data=1, fsdp=1, tensor=1, expert=1)),
  'fsdp4_expert2': (0, dict(data=1, fsdp=4, tensor=1, expert=2)),
}


def config_on(mesh, num_devices=0):
  config = tiny_lm_config(steps=4, batch_size=8, checkpoint_every=2, log_every=1)
  config.parallel.num_devices = num_devices
  config.parallel.mesh.update(mesh)
  return config


def losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(workdir) if 'loss' in r}


def assert_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-5), a, b)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """4 steps on (data 2, fsdp 2, tensor 2) with checkpoints at steps 2 and 4."""
  workdir = tmp_path_factory.mktemp('saved_on_2x2x2')
  result = run(workdir, config_on(SAVED_ON))
  return workdir, jax.device_get(result.params)


@pytest.mark.parametrize(
  'target', ['fsdp4_expert2', pytest.param('one_device', marks=pytest.mark.slow)]
)
def test_full_state_resumes_on_another_mesh(reference, tmp_path, target):
  saved, final_params = reference
  workdir = tmp_path / 'resumed'
  shutil.copytree(saved, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '4')  # as if the run had stopped after step 2
  num_devices, mesh = TARGETS[target]
  result = run(workdir, config_on(mesh, num_devices))
  expected, got = losses(saved), losses(workdir)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[3], got[4]], [expected[3], expected[4]], rtol=0, atol=1e-5)
  assert_close(jax.device_get(result.params), final_params)
  devices = {d for x in jax.tree.leaves(result.params) for d in x.sharding.device_set}
  assert len(devices) == (num_devices or 8)


@pytest.mark.parametrize('target', sorted(TARGETS))
def test_params_only_restore_onto_another_mesh(reference, target):
  saved, final_params = reference
  num_devices, mesh = TARGETS[target]
  config = config_on(mesh, num_devices)
  layout = param_layout(config, lm_task.model_factory(config.model))
  params, step = ckpt_lib.load_params(str(saved), layout.abstract_params, layout.shardings)
  assert step == 4
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), params, final_params)
  jax.tree.map(
    lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
    params,
    layout.shardings,
  )


def test_a_mesh_that_does_not_fit_the_devices_is_named_and_the_checkpoint_kept(reference, tmp_path):
  saved, _ = reference
  workdir = tmp_path / 'bad'
  shutil.copytree(saved, workdir)
  with pytest.raises(ValueError, match='needs a multiple of 3 devices, but 8 are present'):
    run(workdir, config_on(dict(data=1, fsdp=1, tensor=1, expert=3)))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']
