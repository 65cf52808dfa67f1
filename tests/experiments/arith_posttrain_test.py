"""The kj_arith post-training demo end to end: a seconds-long run and the slow full runlocal."""

import json
import os
import sys

import pytest

from experiments import arith_posttrain
from kuaijax.config_lib import load_config
from kuaijax.train.metrics import read_metrics
from tests import sigkill
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/arith/posttrain.py')
TRAINED = ('sft', 'dpo', 'rft', 'rlmec', 'grpo')


def shrink(config, trained, *, max_new_tokens=48):
  """A kj_arith post-training config (posttrain, GRPO analysis, D2PO) at seconds size: a 1-layer
  policy, 4 SFT steps and 2 steps of every other stage in `trained`."""
  config.parallel.num_devices = 1
  config.train.update(progress=False, async_checkpoint=False)
  config.models.policy.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  config.data.update(limit=64, max_new_tokens=max_new_tokens)
  for name in trained:
    if config.stage[name].type == 'train':
      steps = 4 if name == 'sft' else 2
      config.stage[name].train.update(
        steps=steps, batch_size=2, log_every=1, checkpoint_every=steps, eval_every=steps
      )
  return config


def tiny_config(arg):
  config = shrink(load_config(f'{CONFIG}:runlocal,{arg}'), TRAINED)
  config.stage.pairs.gold_fallback = True
  config.stage.samples.update(limit=4, batch_size=4)
  config.stage.rlmec_samples.update(limit=2, num_samples=2, batch_size=2)
  config.stage.grpo.options.update(group_size=2, offline_injection=True)
  config.evals.arith.update(groups=(1, 2), per_group=3, seeds=(0, 1), batch_size=6)
  return config


def test_tiny_demo_writes_the_table_and_plots(tmp_path):
  config = tiny_config('stages=sft+dpo+rft+rlmec+grpo')
  config.stage.sft.optimizer.update(lr=1e-2, warmup_steps=1)
  results = arith_posttrain.run(config, str(tmp_path))
  stages = results['runs']['0']
  assert results['seeds'] == {'training': [0], 'sampling': [0, 1]}
  assert [n for n in stages if 'eval' in stages[n]] == list(TRAINED)
  for name in TRAINED:
    ev = stages[name]['eval']
    assert ev['num_seeds'] == 2 and {'accuracy/level_1', 'accuracy/level_2/std'} <= set(ev)
    assert 'greedy/accuracy' in ev
  sft_losses = [r['loss'] for r in read_metrics(str(tmp_path / 'seed_0' / 'sft')) if 'loss' in r]
  assert len(sft_losses) == 4 and sft_losses[-1] < sft_losses[0] - 0.2
  assert stages['pairs']['summary']['pairs'] > 0 and stages['rlmec']['summary']['examples'] > 0
  assert stages['rft']['summary']['gold'] == 4  # with_gold: each sampled prompt's solution
  table = (tmp_path / 'results.md').read_text()
  for row in (
    '| SFT |',
    '| DPO |',
    '| RFT |',
    '| RLMEC |',
    '| GRPO (bnpo, group) |',
    'level 2',
    '±',
  ):
    assert row in table
  assert json.loads((tmp_path / 'results.json').read_text())['order'] == list(stages)
  assert (tmp_path / 'loss_curves.png').stat().st_size > 0
  # `sft_from=`: a stage from the finished SFT run; the imported policy gets its own row and its
  # evaluation equals the original's.
  config = tiny_config(f'stages=sft,sft_from={tmp_path / "seed_0" / "sft"}')
  again = arith_posttrain.run(config, str(tmp_path / 'imported'))
  assert again['runs']['0']['sft']['type'] == 'params'
  assert again['runs']['0']['sft']['eval'] == stages['sft']['eval']
  assert (tmp_path / 'imported' / 'shared' / 'sft' / 'stage.json').exists()  # seed-free
  assert '| SFT (imported) |' in (tmp_path / 'imported' / 'results.md').read_text()


def test_bad_config_args_are_refused():
  with pytest.raises(ValueError, match='dpo_loss'):
    load_config(f'{CONFIG}:runlocal,dpo_loss=nope')
  with pytest.raises(ValueError, match='unknown config arg'):
    load_config(f'{CONFIG}:runlocal,stage=sft')


@pytest.mark.parametrize('variant', ['runlocal,', ''])
def test_lora_rows_have_the_full_rows_budget(variant):
  """`lora=True`: `sft_lora` trains adapters (role `policy_lora`: the policy plus a lora section)
  with the same steps, batch, schedule and start as the full `sft_more` row, at 10x its learning
  rate; both appear in the stages and default to nothing without the arg; the role follows the
  policy's fields."""
  config = load_config(f'{CONFIG}:{variant}lora=True,stages=sft+dpo')
  full, lora = config.stage.sft_more, config.stage.sft_lora
  assert config.stages == 'sft+dpo+sft_more+sft_lora'
  assert full.model == 'policy' and lora.model == 'policy_lora'
  assert full.method == lora.method == 'sft' and full.data == lora.data == 'task:train'
  assert full.init_from == lora.init_from == 'sft'
  assert full.train.to_dict() == lora.train.to_dict() == config.stage.rft.train.to_dict()
  assert lora.optimizer.lr == pytest.approx(10 * full.optimizer.lr)
  assert full.optimizer.lr == config.stage.rft.optimizer.lr
  rest = lambda block: {k: v for k, v in block.optimizer.items() if k != 'lr'}  # noqa: E731
  assert rest(full) == rest(lora)
  section = config.models.policy_lora.to_dict()
  assert section.pop('lora')['rank'] > 0 and section == config.models.policy.to_dict()
  config.models.policy.d_model = 48  # (as --config.models.policy.d_model=48 would)
  assert config.models.policy_lora.d_model == 48
  assert 'sft_lora' not in load_config(f'{CONFIG}:{variant}stages=sft').stage


def test_tiny_lora_row_beside_full_sft(tmp_path):
  """A seconds-long run of `stages=sft,lora=True`: SFT, then the continued full and LoRA rows,
  all three in the table."""
  config = tiny_config('stages=sft,lora=True')
  config = shrink(config, ('sft', 'sft_more', 'sft_lora'))
  results = arith_posttrain.run(config, str(tmp_path))
  stages = results['runs']['0']
  assert [n for n in stages if 'eval' in stages[n]] == ['sft', 'sft_more', 'sft_lora']
  assert stages['sft_lora']['model'] == 'policy_lora' and stages['sft_lora']['params'] == 'merged'
  assert stages['sft_lora']['summary']['steps'] == stages['sft_more']['summary']['steps'] == 2
  table = (tmp_path / 'results.md').read_text()
  assert '| SFT (continued) |' in table and '| SFT (continued, LoRA r=8) |' in table


@pytest.mark.slow
def test_full_runlocal(tmp_path):
  """The README command: the table has every method; SFT learns level 1 (measured 45% greedy)."""
  config = load_config(f'{CONFIG}:runlocal')
  config.train.progress = False
  results = arith_posttrain.run(config, str(tmp_path))
  stages = results['runs']['0']
  rows = [n for n, s in stages.items() if 'eval' in s]
  assert rows == ['sft', 'dpo', 'grpo']
  assert stages['sft']['eval']['greedy/accuracy/level_1'] > 0.2
  assert (tmp_path / 'results.md').exists()


KILL_FLAGS = [
  '--config.parallel.num_devices=1',
  '--config.train.progress=False',
  '--config.train.async_checkpoint=False',
  '--config.models.policy.d_model=32',
  '--config.models.policy.num_layers=1',
  '--config.models.policy.num_heads=2',
  '--config.models.policy.num_kv_heads=1',
  '--config.models.policy.d_ff=64',
  '--config.data.limit=32',
  '--config.data.max_new_tokens=32',
  '--config.stage.sft.train.steps=4',
  '--config.stage.sft.train.batch_size=2',
  '--config.stage.samples.limit=4',
  '--config.stage.samples.batch_size=4',
  '--config.stage.pairs.gold_fallback=True',
  '--config.stage.dpo.train.steps=30',
  '--config.stage.dpo.train.batch_size=2',
  '--config.stage.dpo.train.log_every=1',
  '--config.stage.dpo.train.checkpoint_every=2',
  '--config.stage.dpo.train.eval_every=30',
  '--config.evals.arith.groups=(1,)',
  '--config.evals.arith.per_group=2',
  '--config.evals.arith.seeds=(0,)',
  '--config.evals.arith.batch_size=2',
]


def _command(workdir):
  config = f'--config={CONFIG}:runlocal,stages=sft+dpo'
  return [sys.executable, '-m', 'kuaijax.main', config, f'--workdir={workdir}', *KILL_FLAGS]


def test_sigkill_in_the_dpo_stage_then_rerun_resumes_exactly(tmp_path):
  """A real SIGKILL of `python -m kuaijax.main` in the middle of the DPO stage (after its second
  checkpoint): re-running the command keeps SFT, samples and pairs untouched and ends with the
  losses and evaluation of an uninterrupted run, bit for bit."""
  sigkill.run(_command(tmp_path / 'straight'))
  killed = tmp_path / 'killed'
  sigkill.kill_after_checkpoints(_command(killed), killed / 'seed_0' / 'dpo')
  assert not (killed / 'seed_0' / 'dpo' / 'stage.json').exists(), 'DPO finished before the kill'
  stamps = {
    name: sigkill.file_stamps(killed / 'seed_0' / name) for name in ('sft', 'samples', 'pairs')
  }
  sigkill.run(_command(killed))
  assert {n: sigkill.file_stamps(killed / 'seed_0' / n) for n in stamps} == stamps
  straight = sigkill.stage_outcome(tmp_path / 'straight' / 'seed_0' / 'dpo')
  resumed = sigkill.stage_outcome(killed / 'seed_0' / 'dpo')
  assert [r['step'] for r in resumed[0] if 'loss' in r] == list(range(1, 31))
  assert straight == resumed
