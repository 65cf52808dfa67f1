"""The stage pipeline: ordering from declared refs, model roles, seeds, stage data sets, custom
stage types, kill-and-resume."""

import os
import shutil
import zlib

import jax
import ml_collections
import numpy as np
import pytest

from kuaijax.config_lib import load_config
from kuaijax.data import records as records_lib
from kuaijax.methods import register_method
from kuaijax.methods.sft import SFT
from kuaijax.stages import runner
from kuaijax.stages.base import register_stage_type, stage_seed
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train.metrics import read_metrics
from tests.conftest import REPO_ROOT

CD = ml_collections.ConfigDict
CALLS = {'take': 0, 'crash_at': 0, 'rollouts': 0}


@register_stage_type('test_take', refs=('data',))
def _take(stage):
  """A custom non-training stage: the first `count` task records with the answer in the prompt."""
  CALLS['take'] += 1
  records = stage.records(stage.block.data)[: stage.block.count]
  stage.write_data([{**r, 'prompt': r['prompt'] + '#'} for r in records])
  return {'records': len(records)}


@register_method('test_crashing_sft')
class CrashingSFT(SFT):
  """SFT whose per-batch hook raises on its `CALLS['crash_at']`-th call (a kill mid-stage)."""

  def rollout(self, model, batch, rng):
    CALLS['rollouts'] += 1
    if CALLS['rollouts'] == CALLS['crash_at']:
      raise RuntimeError('killed')
    return batch


def tiny_config(stages: str):
  config = load_config(os.path.join(REPO_ROOT, 'configs/arith/posttrain.py') + ':runlocal')
  config.unlock()
  config.stages = stages
  config.parallel.num_devices = 1
  config.train.update(progress=False, async_checkpoint=False)
  config.models.policy.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  config.data.update(limit=16, seq_len=256, max_new_tokens=16)
  config.evals = CD()
  train = dict(steps=4, batch_size=2, log_every=1, checkpoint_every=2, eval_every=4)
  config.stage.sft.train.update(train)
  config.stage.samples.update(limit=2, num_samples=2, batch_size=2)
  config.stage.take = CD(dict(type='test_take', data='task:train', count=3))
  config.stage.ft = CD(config.stage.sft.to_dict())
  config.stage.ft.update(method='test_crashing_sft', data='samples', init_from='sft')
  config.lock()
  return config


def test_stage_order_adds_dependencies_and_refuses_cycles():
  config = tiny_config('dpo+grpo')
  assert runner.stage_order(config) == ['sft', 'samples', 'pairs', 'dpo', 'grpo']
  config = tiny_config('rlmec,sft')
  assert runner.stage_order(config) == ['sft', 'rlmec_samples', 'rlmec_rewrites', 'rlmec']
  with config.unlocked():
    config.stage.sft.init_from = 'rlmec'
  with pytest.raises(ValueError, match='cycle: rlmec -> sft -> rlmec'):
    runner.stage_order(config)
  with pytest.raises(ValueError, match="stage 'nope'"):
    runner.stage_order(tiny_config('sft+nope'))


def test_seeds_come_from_stage_names():
  assert stage_seed(0, 'sft') == zlib.crc32(b'sft') % 2**31
  assert stage_seed(5, 'sft/data') == (5 + zlib.crc32(b'sft/data')) % 2**31
  assert len({stage_seed(0, n) for n in ('sft', 'dpo', 'grpo', 'sft/data')}) == 4


def test_custom_stage_writes_a_data_set_and_is_not_redone(tmp_path):
  CALLS['take'] = 0
  done = runner.run_pipeline(tiny_config('take'), str(tmp_path))[0]
  assert list(done) == ['take'] and done['take']['summary'] == {'records': 3}
  written = records_lib.read_records(str(tmp_path / 'seed_0' / 'take' / done['take']['data']))
  assert [r['prompt'][-1] for r in written] == ['#'] * 3 and 'answer' in written[0]
  again = runner.run_pipeline(tiny_config('take'), str(tmp_path))[0]
  assert CALLS['take'] == 1 and again['take'] == done['take']
  with pytest.raises(ValueError, match='stage type'):
    bad = tiny_config('take')
    with bad.unlocked():
      bad.stage.take.type = 'nope'
    runner.run_pipeline(bad, str(tmp_path / 'bad'))


def test_pipeline_killed_in_stage_3_resumes_there(tmp_path):
  """sft -> samples -> ft: a run killed in the middle of ft, re-run with the same command, leaves
  sft and samples untouched and ends with the params of an uninterrupted run."""
  CALLS.update(rollouts=0, crash_at=0)
  straight = runner.run_pipeline(tiny_config('ft'), str(tmp_path / 'a'))[0]
  assert list(straight) == ['sft', 'samples', 'ft']
  samples = records_lib.read_records(str(tmp_path / 'a' / 'seed_0' / 'samples' / 'data.jsonl'))
  assert len(samples) == straight['samples']['summary']['samples'] == 4
  assert {'completion_tokens', 'logprobs', 'correct', 'index', 'gold'} <= set(samples[0])
  # The same finished first two stages, then a run killed at ft's third step.
  work = tmp_path / 'b'
  for name in ('sft', 'samples'):
    shutil.copytree(tmp_path / 'a' / 'seed_0' / name, work / 'seed_0' / name)
  files = [p for p in work.rglob('*') if p.is_file()]
  stamps = {p: p.stat().st_mtime_ns for p in files}
  CALLS.update(rollouts=0, crash_at=3)
  with pytest.raises(RuntimeError, match='killed'):
    runner.run_pipeline(tiny_config('ft'), str(work))
  assert not (work / 'seed_0' / 'ft' / 'stage.json').exists()
  assert latest_params(work)[0] == 2
  CALLS.update(rollouts=0, crash_at=0)
  resumed = runner.run_pipeline(tiny_config('ft'), str(work))[0]
  assert CALLS['rollouts'] == 2  # steps 3 and 4 only
  assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # earlier stages untouched
  assert [r['step'] for r in read_metrics(str(work / 'seed_0' / 'ft')) if 'loss' in r] == [1, 2, 3, 4]
  assert resumed['ft']['summary']['steps'] == 4
  (step_a, params_a), (step_b, params_b) = latest_params(tmp_path / 'a'), latest_params(work)
  assert step_a == step_b == 4
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def latest_params(workdir):
  """(latest step, params) of the ft stage's checkpoints, as saved."""
  ckpt = ckpt_lib.Checkpointer(
    str(workdir / 'seed_0' / 'ft' / 'checkpoints'), keep=9, save_every=1
  )
  step = ckpt.latest_step()
  params = ckpt.restore(step)['params']
  ckpt.close()
  return step, params
