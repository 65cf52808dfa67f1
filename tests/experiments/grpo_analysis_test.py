"""The GRPO analysis (configs/grpo/analysis.py through the post-training experiment): rows differ
from grpo_all in one option each, and a tiny run over two training seeds gives the table, the
training statistics from the logs and the paired accuracy differences."""

import os

import numpy as np
import pytest

from experiments import arith_posttrain
from kuaijax.config_lib import load_config
from kuaijax.train.metrics import read_metrics
from tests.conftest import REPO_ROOT
from tests.experiments.arith_posttrain_test import shrink

CONFIG = os.path.join(REPO_ROOT, 'configs/grpo/analysis.py')


def test_rows_change_one_option_each():
  config = load_config(CONFIG + ':repro')
  assert config.seeds == (0, 1, 2)
  assert config.stage.sft.shared_seed == 0  # one SFT policy, post-trained by every seed
  assert 'shared_seed' not in load_config(CONFIG + ':repro,sft_per_seed=True').stage.sft
  gpu = load_config(CONFIG + ':gpu')  # the same rows and SFT policy, longer GRPO
  assert gpu.stages == config.stages and gpu.stage.sft.to_dict() == config.stage.sft.to_dict()
  assert (gpu.stage.grpo_length.train.steps, gpu.stage.grpo_length.train.batch_size) == (120, 32)
  with pytest.raises(ValueError, match='alternatives'):
    load_config(CONFIG + ':gpu,repro')
  rows = config.stages.split(',')
  assert rows == [
    'sft',
    'grpo_all',
    'grpo_negative',
    'grpo_positive',
    'grpo_length',
    'grpo_injection',
  ]
  reference = config.stage.grpo_all.to_dict()
  changed = {
    'grpo_negative': {('options', 'sample_filter'): 'negative_only'},
    'grpo_positive': {('options', 'sample_filter'): 'positive_only'},
    'grpo_length': {('options', 'reward'): 'relative_length'},
    'grpo_injection': {('options', 'offline_injection'): True},
  }
  for name, change in changed.items():
    block = config.stage[name].to_dict()
    diff = {
      (section, key): value
      for section in ('options', 'train', 'optimizer', 'loss')
      for key, value in block[section].items()
      if reference[section][key] != value
    }
    assert diff == change, name
    assert block['init_from'] == 'sft'
  picked = load_config(CONFIG + ':runlocal,stages=grpo_all+grpo_negative')
  assert picked.stages == 'sft,grpo_all,grpo_negative' and picked.seeds == (0,)
  with pytest.raises(ValueError, match='unknown rows'):
    load_config(CONFIG + ':runlocal,stages=grpo_sideways')
  shared = load_config(CONFIG + ':repro,sft_from=/tmp/policy/sft')
  assert shared.stage.sft.to_dict() == {
    'type': 'params',
    'label': 'SFT (imported)',
    'path': '/tmp/policy/sft',
  }
  assert shared.stage.grpo_all.to_dict() == config.stage.grpo_all.to_dict()


def test_tiny_run_over_two_seeds(tmp_path):
  config = load_config(CONFIG + ':runlocal,seeds=0+1,stages=grpo_all+grpo_negative+grpo_injection')
  rows = config.stages.split(',')
  shrink(config, rows, max_new_tokens=56)  # every gold solution fits (injection)
  for name in rows[1:]:
    config.stage[name].options.group_size = 2
  config.stage.grpo_injection.options.injection_max_accuracy = 1.0  # every group gets one
  with config.unlocked():
    config.stage.sft.shared_seed = 0  # as in `repro`: one SFT policy for both seeds
  config.evals.arith.update(groups=(1, 2), per_group=3, seeds=(0, 1), batch_size=6)
  results = arith_posttrain.run(config, str(tmp_path))
  assert results['seeds'] == {'training': [0, 1], 'sampling': [0, 1]}
  for name in ('grpo_all', 'grpo_injection'):
    logs = [
      [
        r
        for r in read_metrics(str(tmp_path / f'seed_{s}' / name))
        if 'zero_advantage_fraction' in r
      ]
      for s in (0, 1)
    ]
    zero = [np.mean([r['zero_advantage_fraction'] for r in log]) for log in logs]
    summary = results['grpo_training'][name]
    assert summary['zero_advantage_fraction'] == pytest.approx(
      [np.mean(zero), np.std(zero, ddof=1)]
    )
    assert summary['completion_length'][0] == pytest.approx(
      np.mean([log[-1]['completion_length'] for log in logs])
    )
  assert results['grpo_training']['grpo_all']['injected'][0] == 0.0
  assert results['grpo_training']['grpo_injection']['injected'][0] > 0.0
  assert 'sft' not in results['grpo_training']
  runs = results['runs']
  assert runs['0']['sft']['seed'] == runs['1']['sft']['seed'] == 0
  assert not (tmp_path / 'seed_1' / 'sft').exists()
  for stages in runs.values():
    ev = stages['grpo_negative']['eval']
    assert 0.0 <= ev['runs/uncertain'] <= ev['runs/solved_any'] <= 1.0
    assert ev['completion_length'] > 0
  table = (tmp_path / 'results.md').read_text()
  for text in ('| GRPO, negative-only (bnpo, group) |', 'zero-advantage groups %', '±'):
    assert text in table
  sft = runs['0']['sft']['eval']  # shared: its ± is over its sampling seeds
  sft_all = f'{100 * sft["accuracy"]:.1f} ± {100 * sft["accuracy/std"]:.1f}'
  assert '| SFT † | ' in table and sft_all in table.split('| SFT † |')[1].split('\n')[0]
  assert '† trained once and shared by every training seed' in table
  diffs = [
    runs[s]['grpo_negative']['eval']['accuracy'] - runs[s]['grpo_all']['eval']['accuracy']
    for s in runs
  ]
  row = f'| grpo_negative | {100 * np.mean(diffs):+.4f} ± {100 * np.std(diffs, ddof=1):.4f} |'
  assert row in table
