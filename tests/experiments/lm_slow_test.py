"""The README's main job in full: every task's validation loss must beat the unigram baseline."""

import os

import pytest

from kuaijax.config_lib import load_config
from kuaijax.main import run_experiment
from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_runlocal_beats_unigram_on_every_task(tmp_path):
  config = load_config(os.path.join(REPO_ROOT, 'configs/lm/mixture.py') + ':runlocal')
  config.train.progress = False
  results = run_experiment(config, str(tmp_path))
  assert results['beats_unigram'] == {t: True for t in ('code', 'arith', 'copy', 'recall')}
  assert results['seeds'] == {'training': [0], 'sampling': []} and results['step'] == 600
  assert (tmp_path / 'seed_0' / 'lm' / 'stage.json').exists()  # the pipeline's one stage
