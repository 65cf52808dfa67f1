"""experiments/bench_moe.py at its seconds-long runlocal size: the table, results and the bar chart."""

import json
import os

import pytest

from kuaijax.config_lib import load_config
from kuaijax.main import run_experiment
from tests.colab_test import PNG_MAGIC
from tests.conftest import REPO_ROOT


@pytest.mark.slow  # about 40 s of CPU time (two dozen jitted gradients); the chart: plotting_test
def test_runlocal_writes_ratios_and_their_plot(tmp_path):
  config = load_config(os.path.join(REPO_ROOT, 'configs/topp_moe/bench.py') + ':runlocal')
  config.bench.rounds = 1
  results = run_experiment(config, str(tmp_path))
  for setting in ('top_k', 'top_p'):
    ratios = results['settings'][setting]['ratios']
    assert ratios['dense SwiGLU (same active FLOPs)'] == 1.0 and len(ratios) == 6
  assert json.loads((tmp_path / 'results.json').read_text())['settings'].keys() == {
    'top_k',
    'top_p',
  }
  assert (tmp_path / 'times.png').read_bytes().startswith(PNG_MAGIC)
