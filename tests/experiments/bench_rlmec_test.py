"""bench_rlmec at a tiny size: every side timed over the configured rounds through the harness,
the reported rates and the scoring / forward ratio recomputed from the recorded timings (the
timings themselves are not tested)."""

import json
import os
import statistics

import pytest

from kuaijax.config_lib import load_config
from kuaijax.main import run_experiment
from tests.conftest import REPO_ROOT


def test_tiny_run_reports_medians_and_per_round_ratios(tmp_path):
  config = load_config(os.path.join(REPO_ROOT, 'configs/rlmec/bench.py:runlocal'))
  assert config.bench.rounds >= 5 and config.bench.warmup >= 1
  config.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  config.data.update(levels=(1,), max_new_tokens=8)
  config.bench.update(problems=2, num_samples=2, batch_size=4)
  results = run_experiment(config, str(tmp_path))
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['stages'] == results['stages']
  rounds = config.bench.rounds
  for name, stage in saved['stages'].items():
    assert len(stage['rounds']) == rounds, name
    assert stage['samples'] == 4 and stage['tokens'] > 0
    assert stage['samples_per_s'] * stage['median_s'] == pytest.approx(4, rel=1e-9)
    assert stage['median_s'] == statistics.median(stage['rounds'])
  versus = saved['scoring_vs_forward']
  per_round = [f / s for f, s in zip(versus['forward']['rounds'], versus['score']['rounds'])]
  assert len(per_round) == rounds
  assert versus['ratio']['median'] == pytest.approx(statistics.median(per_round), rel=1e-12)
  assert (versus['ratio']['min'], versus['ratio']['max']) == (min(per_round), max(per_round))
  text = (tmp_path / 'results.md').read_text()
  assert text.startswith('RLMEC stage speed') and 'Command: `' in text
  assert f'{versus["ratio"]["median"]:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})' in text
