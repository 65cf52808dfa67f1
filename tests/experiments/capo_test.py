"""The Parrot / CaPO pipeline end to end: a tiny run (non-slow) and a 2-seed run with every row (slow)."""

import json
import os

import pytest

from experiments import capo
from kuaijax.config_lib import load_config
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/capo/parrot.py')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def tiny_config(arg):
  config = load_config(f'{CONFIG}:runlocal,{arg}')
  config.parallel.num_devices = 1
  config.train.update(progress=False, async_checkpoint=False)
  config.models.policy.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  config.data.update(limit=16, seq_len=256, prompt_len=240, max_new_tokens=16)
  for block in config.stage.values():
    if block.type == 'train':
      block.train.update(steps=2, batch_size=2, log_every=1, checkpoint_every=2, eval_every=2)
      block.optimizer.warmup_steps = 1
    if block.type == 'capo_pairs':
      block.update(data='task:train', limit=4)  # a 2-step ask model writes no usable query yet
  config.stage.sessions.update(num_sessions=4, num_turns=3, max_new_tokens=16, batch_size=4)
  config.evals.kj_dialog8.update(sessions=2, num_turns=2, batch_size=2)
  config.evals.kj_dialog_pairs.update(sessions=2, batch_size=4)
  return config


def _check_outputs(workdir, results, labels, seeds):
  table = (workdir / 'results.md').read_text()
  assert all(f'| {label} |' in table for label in labels)
  assert set(results['rows']) == set(labels)
  for row in results['rows'].values():
    assert len(row['accuracy/turn_1']) == seeds and 'context_sensitivity' in row
    for kind in ('neglect', 'hallucination', 'misunderstanding', 'all'):
      for metric in ('preference_accuracy', 'reward_accuracy', 'margin', 'reward_margin'):
        assert len(row[f'pairs/{kind}/{metric}']) == seeds
  assert '## Held-out CaPO pairs (validation split, 2 sessions;' in table
  # sft_long is the implicit-reward reference: against itself every reward is 0.
  long_sft = results['rows']['SFT, long sessions']
  assert long_sft['pairs/all/reward_accuracy'] == [0.0] * seeds
  assert long_sft['pairs/all/reward_margin'] == [0.0] * seeds
  saved = json.loads((workdir / 'results.json').read_text())
  assert saved['rows'] == results['rows']
  for name in ('accuracy_by_turn.png', 'loss_curves.png'):
    assert (workdir / name).read_bytes().startswith(PNG_MAGIC)


def test_tiny_pipeline_writes_the_table(tmp_path):
  """The two SFT rows (the other stages: the slow test and tests/methods/parrot_test.py)."""
  results = capo.run(tiny_config('seeds=0,stages=sft_long+sft_short'), str(tmp_path))
  labels = ['SFT, long sessions', 'SFT, short sessions (1-2 turns)']
  _check_outputs(tmp_path, results, labels, seeds=1)
  short = results['rows']['SFT, short sessions (1-2 turns)']
  assert short['pairs/all/reward_margin'][0] != 0.0  # scored against sft_long, another model


@pytest.mark.slow
def test_every_row_over_two_seeds(tmp_path):
  results = capo.run(tiny_config('seeds=0+1'), str(tmp_path))
  kinds = ('neglect', 'hallucination', 'misunderstanding', 'all')
  labels = ['SFT, short sessions (1-2 turns)', 'SFT, long sessions']
  _check_outputs(tmp_path, results, labels + [f'+ CaPO ({k})' for k in kinds], seeds=2)
  assert 'Parrot-Ask sessions (queries' in (tmp_path / 'results.md').read_text()
  for stages in results['runs'].values():
    assert stages['sessions']['summary']['queries'] > 0
    assert stages['capo_all']['summary']['pairs'] == stages['pairs_all']['summary']['pairs'] > 0
  # Re-running finds every stage finished and writes the same table.
  again = capo.run(tiny_config('seeds=0+1'), str(tmp_path))
  assert again['rows'] == results['rows']


def test_config_args():
  config = load_config(f'{CONFIG}:runlocal,kinds=neglect+all,seeds=0+1')
  # sft_long first: it is the reference of every later policy's kj_dialog_pairs evaluation.
  assert config.stages == 'sessions+sft_long+sft_short+capo_neglect+capo_all' and config.seeds == (
    0,
    1,
  )
  assert load_config(f'{CONFIG}:stages=sft_short').stages == 'sft_short'
  assert load_config(f'{CONFIG}:kinds=none').stages == 'sft_long+sft_short'
  pairs = config.evals.kj_dialog_pairs
  assert (pairs.type, pairs.split, pairs.reference) == ('kj_dialog_pairs', 'validation', 'sft_long')
  assert pairs.beta == config.stage.capo_all.loss.beta
  with pytest.raises(ValueError, match='random'):
    load_config(f'{CONFIG}:kinds=random')


def test_reproduction_settings():
  """repro / gpu: a larger policy trained on the whole train split, every CaPO row at the same
  budget, held-out evaluation sets larger than runlocal's."""
  runlocal, repro, gpu = (load_config(f'{CONFIG}:{arg}') for arg in ('runlocal', 'repro', 'gpu'))
  assert repro.data.limit == 0 and runlocal.data.limit > 0
  assert repro.models.policy.d_model > runlocal.models.policy.d_model
  assert gpu.models.policy.d_model > repro.models.policy.d_model
  for config in (repro, gpu):
    stage = config.stage
    assert stage.sft_long.train.to_dict() == stage.sft_short.train.to_dict()
    assert stage.sft_long.train.steps > runlocal.stage.sft_long.train.steps
    capo_rows = [block.train for name, block in stage.items() if name.startswith('capo_')]
    assert len(capo_rows) == 4 and len({(t.steps, t.batch_size) for t in capo_rows}) == 1
    assert config.evals.kj_dialog8.sessions > runlocal.evals.kj_dialog8.sessions
  with pytest.raises(ValueError, match='alternatives'):
    load_config(CONFIG + ':repro,gpu')
