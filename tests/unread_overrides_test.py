"""Command-line overrides the run never reads: the read tracker of `config_reads.track_reads` on
the ways the code copies configs, and `kuaijax.main` on a real run (configs/lm/bench_train.py,
whose benchmark never reads `train.z_loss`: it builds its loss without one)."""

import copy
import json
import logging
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from kuaijax import config_reads, main
from tests.conftest import REPO_ROOT

CD = ml_collections.ConfigDict
BENCH = 'configs/lm/bench_train.py:runlocal'
# Leaves the benchmark reads, and small enough sizes for a seconds-long run.
USED = [
  '--config.parallel.num_devices=1',
  '--config.bench.matmul_size=64',
  '--config.bench.transformers=False',
  '--config.data.seq_len=32',
]
UNUSED = '--config.train.z_loss=0.1'


def pipeline_like_config():
  """The shapes of a pipeline config: shared sections, stage blocks, roles, a shared reference."""
  config = CD()
  config.train = CD(dict(steps=10, seed=0, z_loss=0.0))
  config.optimizer = CD(dict(lr=1e-3, warmup_steps=5))
  config.stage = CD(dict(sft=CD(dict(train=CD(dict(steps=3)), optimizer=CD()))))
  config.models = CD(dict(policy=CD(dict(d_model=8, hf=''))))
  config.eval_file = ''
  config.evals = CD(dict(text=CD(dict(eval_file=config.get_ref('eval_file'), batch_size=2))))
  return config.lock()


def stage_train_config(config):
  """What the stages do (kuaijax.stages.roles / builtin): copy the config, put the role's section
  (without its 'hf' key) in `model`, update the shared sections with the block's overrides."""
  out = CD(config.to_dict())
  spec = config.models.policy.to_dict()
  spec.pop('hf')
  with out.unlocked():
    out.model = CD(spec)
  out.train.update(config.stage.sft.train.to_dict())
  out.optimizer.update(config.stage.sft.optimizer.to_dict())
  out.train.seed = 7  # set by the code: reading it later is not a read of train.seed
  return out


def test_reads_follow_copies_updates_and_shared_references():
  config = pipeline_like_config()
  with config_reads.track_reads(config) as tracker:
    out = stage_train_config(config)
    assert (out.train.steps, out.train.seed, out.optimizer.lr) == (3, 7, 1e-3)
    assert out.optimizer.warmup_steps == 5 and out.model.d_model == 8
    assert copy.deepcopy(out).evals.text.eval_file == ''
    # Printing, comparing and serialising (the run's config.json) read nothing.
    str(config), repr(out), config == out, out.to_json_best_effort(), json.dumps(config.to_json())
  overrides = [
    'train.steps',  # shadowed by stage.sft.train.steps: never read
    'train.seed',  # overwritten by the code before anything read it
    'train.z_loss',
    'stage.sft.train.steps',
    'optimizer.lr',  # the block does not set lr: the shared one is read
    'optimizer.warmup_steps',
    'models.policy.d_model',
    'models.policy.hf',  # popped from the role's dict: taken by the code
    'eval_file',  # read through evals.text.eval_file, the same reference
    'evals.text.batch_size',
  ]
  unread = config_reads.unread_overrides(tracker, overrides)
  assert unread == ['train.steps', 'train.seed', 'train.z_loss', 'evals.text.batch_size']


def test_a_dict_used_as_a_dict_counts_as_read_and_tracking_ends_with_the_block():
  config = pipeline_like_config()
  getitem = CD.__getitem__
  with config_reads.track_reads(config) as tracker:
    options = dict(config.train.to_dict())  # e.g. keyword options: its reads are invisible
    del options
    config.optimizer.lr  # noqa: B018  (a read)
    copied = CD(config.models.to_dict())  # copied, not read: the copy's reads count
    with pytest.raises(RuntimeError, match='already active'), config_reads.track_reads(config):
      pass
  assert copied.policy.d_model == 8
  assert config_reads.unread_overrides(tracker, ['train.z_loss', 'optimizer.warmup_steps']) == [
    'optimizer.warmup_steps'
  ]
  assert not tracker.was_read('models.policy.d_model')  # read after the block: not recorded
  assert CD.__getitem__ is getitem and '_kuaijax_leaf_paths' not in config.train.__dict__
  assert set(tracker.leaves) >= {'train.steps', 'stage.sft.train.steps', 'eval_file'}


def parse(argv):
  """The config and {path: value} overrides kuaijax.main gets from this command line."""
  argv = ['kuaijax.main', *argv]
  flag_values = flags.FlagValues()
  holder, _ = main.define_flags(flag_values, sys_argv=argv)
  flag_values(argv)
  return holder.value, config_flags.get_override_values(flag_values['config'])


def test_overrides_the_run_reads_pass_and_an_unread_one_is_named(tmp_path, caplog):
  workdir = tmp_path / 'run'
  config, overrides = parse([f'--config={BENCH}', f'--workdir={workdir}', *USED])
  assert overrides['bench.matmul_size'] == 64
  results = main.run_checked(config, str(workdir), overrides)  # every override read: no error
  assert results['seq_len'] == 32
  # The same unread override again in a workdir that holds a run: a warning naming it.
  config, overrides = parse([f'--config={BENCH}', f'--workdir={workdir}', *USED, UNUSED])
  with caplog.at_level(logging.WARNING):
    main.run_checked(config, str(workdir), overrides)
  warned = [r.getMessage() for r in caplog.records if 'never read' in r.getMessage()]
  assert len(warned) == 1 and '--config.train.z_loss=0.1' in warned[0]
  assert 'matmul_size' not in warned[0] and 'earlier run' in warned[0]


def test_main_exits_with_an_error_naming_the_unread_override(tmp_path):
  """`python -m kuaijax.main` in a new workdir: the run finishes (results.json is written), then
  the unread override is an error naming it."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'kuaijax.main', f'--config={BENCH}', f'--workdir={workdir}']
  out = subprocess.run(
    [*cmd, *USED, UNUSED],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'XLA_FLAGS': ''},
  )
  assert out.returncode != 0
  assert 'UnreadOverridesError' in out.stderr and '--config.train.z_loss=0.1' in out.stderr
  assert 'matmul_size' not in out.stderr.split('UnreadOverridesError')[-1]
  assert (workdir / 'results.json').exists()
