"""The early-exit experiment end to end (tiny), bad config, and the runlocal run (slow)."""

import json
import os

import pytest

from kuaijax.config_lib import load_config
from kuaijax.main import run_experiment
from tests.colab_test import PNG_MAGIC
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/early_exit/arith.py')


def tiny_config():
  config = load_config(CONFIG + ':runlocal')
  config.parallel.num_devices = 1
  config.data.update(train_examples=16, seq_len=256)
  config.model.update(d_model=32, num_layers=3, num_heads=2, num_kv_heads=1, d_ff=64)
  config.train.update(steps=2, batch_size=2, log_every=1, checkpoint_every=2, progress=False)
  config.train.async_checkpoint = False
  config.exit.update(thresholds=(0.5,), agreement=False, gate_thresholds=())
  # gate_problems = test problems: the gate's read-outs reuse the test rows' compiled shape.
  config.eval.update(levels=(1,), problems_per_level=2, gate_problems=2, max_new_tokens=6)
  config.eval.timing_repeats = 1
  return config


def test_tiny_run(tmp_path):
  results = run_experiment(tiny_config(), str(tmp_path))
  rows = {r['setting']: r for r in results['settings']}
  assert list(rows) == ['full', 'conf 0.5']
  assert rows['full']['avg_layers_decode'] == 3.0 and rows['full']['avg_layers_teacher_forced'] == 3
  assert 1.0 <= rows['conf 0.5']['avg_layers_decode'] <= 3.0
  assert len(results['analysis']['agreement']) == 3 and results['analysis']['agreement'][-1] == 1.0
  for r in rows.values():
    assert r['speed']['batch1']['speedup'] > 0 and r['perplexity'] > 1
  assert '| conf 0.5 |' in (tmp_path / 'results.md').read_text()
  for name in results['plots']:
    assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
  assert json.loads((tmp_path / 'results.json').read_text())['num_layers'] == 3


def test_bad_threshold(tmp_path):
  config = tiny_config()
  config.exit.thresholds = (1.5,)
  with pytest.raises(ValueError, match=r'threshold must be in \(0, 1\]'):
    run_experiment(config, str(tmp_path))


@pytest.mark.slow
def test_runlocal(tmp_path):
  config = load_config(CONFIG + ':runlocal')
  config.parallel.num_devices = 1  # as on a CPU host: the suite simulates 8 devices
  config.train.progress = False
  results = run_experiment(config, str(tmp_path))
  assert results['settings'][0]['avg_layers_decode'] == config.model.num_layers
