"""The early-exit experiment on the stage pipeline end to end (tiny, two training seeds), bad config,
and the runlocal run (slow)."""

import json
import os
import statistics

import numpy as np
import pytest

from experiments import early_exit as ee
from kuaijax.config_lib import load_config
from kuaijax.main import run_experiment
from tests.colab_test import PNG_MAGIC
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/early_exit/arith.py')


def tiny_config(seeds='0'):
  config = load_config(CONFIG + f':runlocal,seeds={seeds}')
  config.parallel.num_devices = 1
  config.data.update(limit=16, seq_len=256)
  config.models.policy.update(d_model=32, num_layers=3, num_heads=2, num_kv_heads=1, d_ff=64)
  config.stage.sft.train.update(
    steps=2, batch_size=2, log_every=1, checkpoint_every=2, eval_every=2
  )
  config.train.update(progress=False, async_checkpoint=False)
  # gate_problems = test problems: the gate's read-outs reuse the test rows' compiled shape.
  config.evals.early_exit.update(
    thresholds=(0.5,),
    agreement=False,
    gate_thresholds=(),
    groups=(1,),
    per_group=2,
    gate_problems=2,
    max_new_tokens=6,
    timing_rounds=2,  # two: the median of per-round ratios differs from the ratio of medians
  )
  return config


def test_tiny_run_over_two_training_seeds(tmp_path):
  results = run_experiment(tiny_config('0+1'), str(tmp_path))
  assert results['seeds'] == {'training': [0, 1], 'sampling': []}
  rows = {r['setting']: r for r in results['summary']['settings']}
  assert list(rows) == ['full', 'conf_0.5']
  assert rows['full']['avg_layers_decode'] == [3.0, 0.0]  # [mean, std] over the seeds
  assert rows['full']['avg_layers_teacher_forced'] == [3.0, 0.0]
  assert 1.0 <= rows['conf_0.5']['avg_layers_decode'][0] <= 3.0
  agreement = results['summary']['layers']['agreement']
  assert len(agreement) == 3 and agreement[-1] == [1.0, 0.0]
  evals = [results['runs'][s]['sft']['eval'] for s in ('0', '1')]
  problems = results['summary']['num_test_problems']
  for label, r in rows.items():
    head = f'early_exit/{label}'
    for batch in ('batch1', 'batch'):
      # Per seed, the speed-up is the median (min, max) of the per-round ratios of the same two
      # interleaved timings and the times are their medians; the table's the seeds' mean.
      ratios = []
      for e in evals:
        normal, early = (
          e[f'{head}/{batch}/normal_rounds_s'],
          e[f'{head}/{batch}/early_exit_rounds_s'],
        )
        assert len(normal) == len(early) == 2
        per_round = [a / b for a, b in zip(normal, early)]
        assert e[f'{head}/{batch}/speedup'] == pytest.approx(
          statistics.median(per_round), rel=1e-12
        )
        assert e[f'{head}/{batch}/speedup_min'] == min(per_round)
        assert e[f'{head}/{batch}/speedup_max'] == max(per_round)
        assert e[f'{head}/{batch}/normal_s'] == statistics.median(normal)
        assert e[f'{head}/{batch}/early_exit_s'] == statistics.median(early)
        ratios.append(statistics.median(per_round))
      assert r[batch]['speedup'] == pytest.approx(
        [np.mean(ratios), np.std(ratios, ddof=1)], rel=1e-9
      )
    for e in evals:  # tokens/s x seconds: the same whole number of generated tokens on both sides
      tokens = e[f'{head}/tokens_per_s_batch'] * e[f'{head}/batch/early_exit_s']
      normal = e[f'{head}/tokens_per_s_normal_batch'] * e[f'{head}/batch/normal_s']
      assert tokens == pytest.approx(round(tokens), abs=1e-6) and normal == pytest.approx(tokens)
      assert problems <= round(tokens) <= problems * 6  # 1 to max_new_tokens=6 tokens each
  for e in evals:  # full depth: the perplexity of the last layer's teacher-forced loss
    assert e['early_exit/full/perplexity'] == pytest.approx(
      np.exp(e['early_exit/layers/loss'][-1]), rel=1e-5
    )
  assert rows['full']['perplexity'][0] == pytest.approx(
    np.mean([e['early_exit/full/perplexity'] for e in evals]), rel=1e-9
  )
  for seed in ('0', '1'):  # each seed's own evaluation, in its stage.json
    stage = json.loads((tmp_path / f'seed_{seed}' / 'sft' / 'stage.json').read_text())
    assert stage['eval']['early_exit/full/avg_layers_decode'] == 3.0
  loss = [e['early_exit/layers/loss'][0] for e in evals]
  assert results['summary']['layers']['loss'][0][0] == pytest.approx(sum(loss) / 2)
  table = (tmp_path / 'results.md').read_text()
  assert '| conf_0.5 |' in table and 'mean ± std over 2 training seeds' in table
  for name in results['plots']:
    assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
  assert json.loads((tmp_path / 'results.json').read_text())['summary']['num_layers'] == 3


def test_one_seed_table_has_no_spread():
  evals = [
    {
      'early_exit/num_layers': 1,
      'early_exit/tokens': 5,
      'early_exit/num_test_problems': 2,
      'early_exit/settings': ['full'],
      **{f'early_exit/layers/{k}': [0.5] for k in ee.LAYER_KEYS},
      **{f'early_exit/full/{k}': 0.25 for k in ee.ROW_KEYS},
      **{f'early_exit/full/{b}/{k}': 2.0 for b in ('batch1', 'batch') for k in ee.SPEED_KEYS},
    }
  ]
  results = {
    'summary': ee.summarise(evals),
    'stage': 'sft',
    'train': {'type': 'train', 'steps': 2, 'wall_s': 1.0, 'seed': 0},
    'wall_s': 2.0,
  }
  config = tiny_config()
  table = ee.results_table(results, config, 1)
  assert '| 1 | 50.0% | 50.0% | 0.500 | 0.500 |' in table and '±' not in table
  assert (
    '| full | 0.25 / 1 | 25.0% | 0.250 | 0.25 | 2.00x (2.00-2.00) | 2.00x (2.00-2.00) | 0 | 0 |'
    in table
  )


def test_cost_breakdown_splits_the_speedup():
  """speed-up 1.2x at 3 of 6 layers with a 0.6x never-exiting decoder: 2.0x measured saving (the
  ideal 2.0x), the rest lost to deciding layer by layer."""
  row = lambda label, speedup, layers: {
    'setting': label,
    'avg_layers_decode': [layers, 0.0],
    **{b: {'speedup': [speedup, 0.0]} for b in ('batch1', 'batch')},
  }
  summary = {'num_layers': 6, 'settings': [row('full', 0.6, 6.0), row('conf_0.9', 1.2, 3.0)]}
  table = ee.cost_breakdown(summary, 1)
  assert '| full | batch1 | 0.60x | 0.60x | 1.00x | 1.00x |' in table
  assert '| conf_0.9 | batch | 1.20x | 0.60x | 2.00x | 2.00x |' in table
  assert ee.cost_breakdown({'num_layers': 6, 'settings': [row('agreement', 1.0, 5.0)]}, 1) == ''


def test_bad_threshold(tmp_path):
  config = tiny_config()
  config.evals.early_exit.thresholds = (1.5,)
  with pytest.raises(ValueError, match=r'threshold must be in \(0, 1\]'):
    run_experiment(config, str(tmp_path))


@pytest.mark.slow
def test_runlocal(tmp_path):
  config = load_config(CONFIG + ':runlocal')
  config.parallel.num_devices = 1  # as on a CPU host: the suite simulates 8 devices
  config.train.progress = False
  results = run_experiment(config, str(tmp_path))
  full = results['summary']['settings'][0]
  assert full['avg_layers_decode'][0] == config.models.policy.num_layers
