"""bench_edits at its runlocal size: both pair kinds timed through the harness over the configured
rounds (warm-up calls first, then one call of each side per round), and the reported rates and
ratio recomputed from the recorded timings (the timings themselves are not tested)."""

import json
import os
import statistics

import numpy as np
import pytest

from experiments import bench_edits
from kuaijax.config_lib import load_config
from kuaijax.data import edits
from kuaijax.main import run_experiment
from tests.conftest import REPO_ROOT


def test_pairs_are_rlmec_like_and_unrelated():
  samples, rewrites, unrelated = bench_edits.pairs(16, 32, 8, seed=3)
  assert len(samples) == len(rewrites) == len(unrelated) == 16
  assert all(len(x) == 32 for x in (*samples, *rewrites, *unrelated))
  # A rewrite keeps its sample up to a random cut: some share a long prefix, not every whole sample.
  shared = [int(np.argmax(np.r_[s != r, True])) for s, r in zip(samples, rewrites)]
  assert max(shared) > 8 and min(shared) < 32
  assert bench_edits.pairs(16, 32, 8, seed=3)[1][5].tolist() == rewrites[5].tolist()  # seeded


def test_runlocal_reports_medians_and_per_round_ratios(tmp_path, monkeypatch):
  config = load_config(os.path.join(REPO_ROOT, 'configs/rlmec/bench_edits.py:runlocal'))
  bc = config.bench
  assert bc.rounds >= 5 and bc.warmup >= 1
  samples, rewrites, unrelated = bench_edits.pairs(bc.num_pairs, bc.length, bc.vocab, bc.seed)
  kinds = {'rlmec_like': rewrites, 'unrelated': unrelated}
  same = lambda a, b: len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  calls = []  # the pair kind(s) each imitation_weights_batch call got, all samples each time
  batch = edits.imitation_weights_batch

  def counted(sample_tokens, rewrite_tokens):
    assert same(sample_tokens, samples)
    calls.append([k for k, v in kinds.items() if same(rewrite_tokens, v)])
    return batch(sample_tokens, rewrite_tokens)

  monkeypatch.setattr(edits, 'imitation_weights_batch', counted)
  results = run_experiment(config, str(tmp_path))
  sides = ['rlmec_like', 'unrelated']
  warmup = [[side] for side in sides for _ in range(bc.warmup)]
  assert calls == warmup + [[side] for side in sides] * bc.rounds
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['num_pairs'] == results['num_pairs'] == bc.num_pairs
  for side in sides:
    assert len(saved[side]['rounds']) == bc.rounds
    assert saved[side]['median_s'] == statistics.median(saved[side]['rounds'])
    rate = saved[f'{side}_pairs_per_s'] * saved[side]['median_s']
    assert rate == pytest.approx(bc.num_pairs, rel=1e-12)
  per_round = [u / r for u, r in zip(saved['unrelated']['rounds'], saved['rlmec_like']['rounds'])]
  assert saved['ratio']['median'] == pytest.approx(statistics.median(per_round), rel=1e-12)
  assert (saved['ratio']['min'], saved['ratio']['max']) == (min(per_round), max(per_round))
  text = (tmp_path / 'results.md').read_text()
  assert text.startswith('RLMEC imitation weights') and 'Command: `' in text
  assert f'{saved["ratio"]["median"]:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})' in text
