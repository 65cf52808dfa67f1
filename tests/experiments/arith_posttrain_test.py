"""The kj_arith post-training demo end to end: a seconds-long run and the slow full runlocal."""

import json
import os

import pytest

from experiments import arith_posttrain
from kuaijax.config_lib import load_config
from kuaijax.train.metrics import read_metrics
from tests.colab_test import PNG_MAGIC
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/arith/posttrain.py')


def tiny_config(stages):
  config = load_config(f'{CONFIG}:runlocal,stages={stages}')
  config.parallel.num_devices = 1
  config.train.update(progress=False, async_checkpoint=False)
  config.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  config.data.update(train_examples=64, max_new_tokens=48)
  for stage, steps in (('sft', 4), ('dpo', 2), ('rlmec', 2), ('grpo', 2)):
    config[stage].train.update(steps=steps, batch_size=2, log_every=1, checkpoint_every=steps)
  config.sft.optimizer.update(lr=1e-2, warmup_steps=1)
  config.dpo.update(problems=4, gold_fallback=True)
  config.rlmec.update(problems=2, num_samples=2)
  config.grpo.update(group_size=2, offline_injection=True)
  config.eval.update(levels=(1, 2), problems_per_level=3, seeds=(0, 1), batch_size=6)
  return config


def test_tiny_demo_writes_the_table_and_resumes(tmp_path):
  config = tiny_config('sft+dpo+rlmec+grpo')
  results = arith_posttrain.run(config, str(tmp_path))
  assert list(results['methods']) == ['sft', 'dpo', 'rlmec', 'grpo']
  for method in results['methods'].values():
    sampled = method['eval']['sampled']
    assert sampled['num_seeds'] == 2 and len(sampled['per_seed']) == 2
    assert {'accuracy/level_1', 'accuracy/level_2', 'accuracy/level_1/std'} <= set(sampled)
  sft_losses = [r['loss'] for r in read_metrics(str(tmp_path / 'sft')) if 'loss' in r]
  assert len(sft_losses) == 4 and sft_losses[-1] < sft_losses[0] - 0.2
  assert results['stats']['dpo']['pairs'] > 0 and results['stats']['rlmec']['examples'] > 0
  table = (tmp_path / 'results.md').read_text()
  for row in ('| SFT |', '| DPO |', '| RLMEC |', '| GRPO |', 'level 2', '±'):
    assert row in table
  assert json.loads((tmp_path / 'results.json').read_text())['stages'] == list(results['methods'])
  assert (tmp_path / 'loss_curves.png').read_bytes().startswith(PNG_MAGIC)
  # A stage alone from the finished SFT workdir: the initial policy gets its own row.
  config = tiny_config('grpo')
  config.init_from = str(tmp_path / 'sft')
  again = arith_posttrain.run(config, str(tmp_path / 'grpo_only'))
  assert list(again['methods']) == ['init', 'grpo']
  assert again['methods']['init']['eval'] == results['methods']['sft']['eval']


def test_bad_stages_are_refused(tmp_path):
  with pytest.raises(ValueError, match='distinct names'):
    arith_posttrain.parse_stages('sft+ppo')
  with pytest.raises(ValueError, match='init_from'):
    arith_posttrain.run(tiny_config('dpo'), str(tmp_path))


@pytest.mark.slow
def test_full_runlocal(tmp_path):
  """The README command: the table has every method; SFT learns level 1 (measured 45% greedy)."""
  config = load_config(f'{CONFIG}:runlocal')
  config.train.progress = False
  results = arith_posttrain.run(config, str(tmp_path))
  assert list(results['methods']) == ['sft', 'dpo', 'grpo']
  assert results['methods']['sft']['eval']['greedy']['accuracy/level_1'] > 0.2
  assert (tmp_path / 'results.md').exists()
