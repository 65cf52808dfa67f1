"""Sweeps: grid algebra, strict keys, resumable local runs, the command list and the table."""

import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from kuaijax import sweep
from tests.conftest import REPO_ROOT

CONFIG = textwrap.dedent(
  """
  import ml_collections

  def get_config(arg=None):
    return ml_collections.ConfigDict(dict(
      experiment='lm', scale=1,
      model=dict(d_model=32, num_layers=2), optimizer=dict(lr=1e-3, name='adam')))

  def get_hyper(hyper, arg=None):
    return hyper.product([
      hyper.sweep('config.optimizer.lr', [1e-3, 3e-3]),
      hyper.zip_([hyper.sweep('model.d_model', [32, 64]), hyper.sweep('model.num_layers', [2, 4])]),
    ])
  """
)


@pytest.fixture
def spec(tmp_path):
  path = tmp_path / 'grid.py'
  path.write_text(CONFIG)
  return str(path)


def test_product_and_zip():
  grid = sweep.product(
    [sweep.sweep('a', [1, 2]), sweep.zip_([sweep.sweep('b', 'xy'), sweep.sweep('c', [5, 6])])]
  )
  assert grid == [
    {'a': 1, 'b': 'x', 'c': 5},
    {'a': 1, 'b': 'y', 'c': 6},
    {'a': 2, 'b': 'x', 'c': 5},
    {'a': 2, 'b': 'y', 'c': 6},
  ]
  assert sweep.product([sweep.fixed('a', 0), sweep.sweep('b', [1, 2])]) == [
    {'a': 0, 'b': 1},
    {'a': 0, 'b': 2},
  ]
  with pytest.raises(ValueError, match='equal length, got \\[2, 3\\]'):
    sweep.zip_([sweep.sweep('a', [1, 2]), sweep.sweep('b', [1, 2, 3])])
  with pytest.raises(ValueError, match="sets \\['a'\\] twice"):
    sweep.product([sweep.sweep('a', [1]), sweep.sweep('a', [2])])


def test_bad_sweep_keys_and_values_are_named(spec, tmp_path):
  from kuaijax.config_lib import load_config

  config = load_config(spec)
  with pytest.raises(KeyError, match="sweep key 'model.d_modl' is not a config field.*d_model"):
    sweep.plan(config, sweep.sweep('model.d_modl', [1]), str(tmp_path))
  with pytest.raises(KeyError, match="'scale.x' is not a config field"):
    sweep.plan(config, sweep.sweep('scale.x', [1]), str(tmp_path))
  with pytest.raises(TypeError, match="sweep key 'model.num_layers': value 'four'"):
    sweep.plan(config, sweep.sweep('model.num_layers', ['four']), str(tmp_path))
  assert (
    len(sweep.load_sweep(os.path.join(REPO_ROOT, 'configs/lm/lr_sweep.py'), str(tmp_path))) == 6
  )
  with pytest.raises(ValueError, match='declares no sweep'):
    sweep.load_sweep(os.path.join(REPO_ROOT, 'configs/lm/mixture.py'), str(tmp_path))


def test_runs_are_resumable_and_collected_into_one_table(spec, tmp_path):
  root = str(tmp_path / 'root')
  runs = sweep.load_sweep(spec, root)
  assert (
    len(runs) == 4 and runs[1].config.model.d_model == 64 and runs[1].config.optimizer.lr == 1e-3
  )
  seen = []

  def runner(config, workdir):
    seen.append(workdir)
    if len(seen) == 3:
      raise RuntimeError('crash in the third run')
    os.makedirs(workdir)
    loss = config.optimizer.lr * config.model.d_model
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump({'model': {'loss': loss}, 'step': 10}, f)

  with pytest.raises(RuntimeError, match='third run'):
    sweep.run_sweep(runs, runner)
  assert len(sweep.run_sweep(runs, runner)) == 2  # the crashed run and the fourth one
  assert seen[3] == seen[2] and len(set(seen)) == 4
  assert sweep.run_sweep(runs, runner) == {}
  rows = sweep.collect(runs, root, ['model.loss'])
  assert [r['model.loss'] for r in rows] == pytest.approx([0.032, 0.064, 0.096, 0.192])
  table = (tmp_path / 'root' / 'sweep.md').read_text()
  assert (
    '| model.d_model=64,model.num_layers=4,optimizer.lr=0.003 | 64 | 4 | 0.003 | done | 0.192 |'
    in table
  )


def test_print_gives_one_main_command_per_run(spec, tmp_path):
  out = subprocess.run(
    [sys.executable, '-m', 'kuaijax.sweep', f'--config={spec}', f'--workdir={tmp_path}', '--print'],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert len(out) == 4
  argv = shlex.split(out[3])
  assert argv[:3] == ['python', '-m', 'kuaijax.main'] and f'--config={spec}' in argv
  assert {
    '--config.model.d_model=64',
    '--config.model.num_layers=4',
    '--config.optimizer.lr=0.003',
  } <= set(argv)
  assert f'--workdir={tmp_path}/model.d_model=64,model.num_layers=4,optimizer.lr=0.003' in argv


TINY_LM = textwrap.dedent(
  """
  import os
  from kuaijax.config_lib import load_config

  def get_config(arg=None):
    config = load_config(os.path.join({root!r}, 'configs/lm/mixture.py:runlocal'))
    config.parallel.num_devices = 1
    config.data.update(seq_len=64, eval_batch_size=8, eval_batches=1)
    config.models.policy.update(d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32)
    config.train.update(steps=2, batch_size=2, log_every=1, eval_every=2, checkpoint_every=2,
                        progress=False, async_checkpoint=False)
    config.eval.unigram_max_examples = 20
    return config

  def get_hyper(hyper, arg=None):
    return hyper.sweep('optimizer.lr', [1e-3, 1e-2])
  """
)


@pytest.mark.slow
def test_the_cli_runs_real_experiments_then_skips_them(tmp_path):
  path = tmp_path / 'tiny.py'
  path.write_text(TINY_LM.format(root=REPO_ROOT))
  cmd = [sys.executable, '-m', 'kuaijax.sweep', f'--config={path}', f'--workdir={tmp_path / "w"}']
  first = subprocess.run(
    [*cmd, '--metrics=model.loss'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
  )
  assert first.returncode == 0, first.stderr[-2000:]
  rows = json.loads((tmp_path / 'w' / 'sweep.json').read_text())
  assert [r['optimizer.lr'] for r in rows] == [1e-3, 1e-2]
  assert all(r['status'] == 'done' and r['model.loss'] > 0 for r in rows)
  again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert again.stdout.count('finished, skipped') == 2
