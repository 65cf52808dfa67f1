"""The pcformer experiment end to end (tiny), its config errors, the notebook, the runlocal run."""

import json
import os

import numpy as np
import pytest

from kuaijax.config_lib import load_config
from kuaijax.main import run_experiment
from tests.colab_test import PNG_MAGIC, execute_notebook
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/pcformer/lm.py')
VARIANTS = ('vanilla', 'ode_rk2_gated', 'pc_rk2', 'pc_rk4', 'vanilla_deep', 'harpe')
TASKS = ('code', 'arith', 'copy', 'recall')


def tiny_config(variants='pc_rk2,harpe'):
  config = load_config(CONFIG + ':runlocal')
  config.parallel.num_devices = 1
  config.data.update(seq_len=32, eval_batch_size=8, eval_batches=1)
  for model in config.models.values():
    model.update(d_model=16, d_ff=32, num_heads=2, num_kv_heads=2)
  config.train.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2, progress=False)
  config.train.async_checkpoint = False
  config.stages = variants
  for name in ('vanilla', 'harpe'):
    config.stage[name].final_evals.retrieval.update(
      context_lengths=(32, 64), depths=(0.5,), per_depth=2
    )
  return config


def test_tiny_run_writes_both_tables_and_plots(tmp_path):
  results = run_experiment(tiny_config(), str(tmp_path))
  table = (tmp_path / 'results.md').read_text()
  rows = {r['variant']: r for r in results['variants']}
  assert list(rows) == ['pc_rk2', 'harpe']
  assert (
    rows['harpe']['block_evals_per_token'] == 2 and rows['pc_rk2']['block_evals_per_token'] == 6
  )
  # PC adds only the stack's few parameters (alpha, norms, packed W and Wc) to the vanilla blocks.
  extra = rows['pc_rk2']['num_params'] - rows['harpe']['num_params']
  assert extra == 1 + 2 * 16 * (2 + 2 * 2) + 2 * 6
  for name, row in rows.items():
    assert row['step'] == 2 and row['tokens_per_s'] > 0, name
    assert all(row['eval'][f'loss/{t}'] > 0 for t in TASKS if f'loss/{t}' in row['eval'])
    assert f'| {name} |' in table
  assert 'Needle retrieval' in table and '32 (train)' in table
  assert set(results['retrieval']) == {'harpe'}  # vanilla did not run
  assert 'HARPE ascending' in results['retrieval']['harpe']['rope']
  for r in results['retrieval'].values():
    assert set(r['by_length']) == {'32', '64'}
  learned = results['learned']['pc_rk2']
  assert len(learned['alpha']) == 2 and len(learned['W']) == 3
  assert learned['W'][0][1] == 0.0  # the upper triangle stays masked
  for name in results['plots']:
    assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
  assert sorted(results['plots']) == ['alpha.png', 'loss_curves.png', 'pc_rk2_corrector.png']
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['variants'][0]['stack'] == 'pc_rk2'
  assert saved['seeds'] == {'training': [0], 'sampling': []} and '1 training seed' in table
  harpe = json.loads((tmp_path / 'seed_0' / 'harpe' / 'stage.json').read_text())
  assert (
    harpe['eval']['passkey/64/accuracy']
    == results['retrieval']['harpe']['by_length']['64']['accuracy']
  )
  pc = json.loads((tmp_path / 'seed_0' / 'pc_rk2' / 'stage.json').read_text())
  assert not any(k.startswith('passkey/') for k in pc['eval'])  # retrieval: vanilla, harpe only


def test_config_variants_and_errors(tmp_path):
  one = load_config(CONFIG + ':runlocal,stages=pc_rk4,seeds=0+1')
  assert one.stages == 'pc_rk4' and one.seeds == (0, 1)
  assert load_config(CONFIG + ':runlocal').stages.split(',') == list(VARIANTS)
  full = load_config(CONFIG)
  assert (full.models.vanilla.d_model, full.models.vanilla.num_layers) == (2048, 24)
  assert full.models.vanilla_deep.num_layers == 72 and full.models.pc_rk2.stack == 'pc_rk2'
  assert set(full.stage.harpe.final_evals) == {'retrieval'} and not full.stage.pc_rk2.final_evals
  config = tiny_config(variants='vanilla,nope')
  with pytest.raises(ValueError, match="stage 'nope' has no block"):
    run_experiment(config, str(tmp_path))
  config = tiny_config(variants='pc_rk2')
  config.models.pc_rk2.pc_alpha = 'per_token'
  with pytest.raises(ValueError, match="model.pc_alpha='per_token' is not one of"):
    run_experiment(config, str(tmp_path))


def test_notebook_runs_at_the_smallest_size(tmp_path):
  workdir = tmp_path / 'workdir'
  nb = execute_notebook(
    'pcformer.ipynb',
    tmp_path,
    KUAIJAX_NOTEBOOK_STEPS='2',
    KUAIJAX_NOTEBOOK_TINY='1',
    KUAIJAX_NOTEBOOK_WORKDIR=str(workdir),
    XLA_FLAGS='',
  )
  results = json.loads((workdir / 'results.json').read_text())
  assert [r['variant'] for r in results['variants']] == ['vanilla', 'pc_rk2', 'harpe']
  outputs = [o for cell in nb.cells for o in cell.get('outputs', [])]
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 3  # alpha, corrector, loss
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'per_stage: 6 caches, max |decode - full| = ' in text


@pytest.mark.slow
def test_runlocal_experiment(tmp_path):
  config = load_config(CONFIG + ':runlocal')
  config.train.progress = False
  results = run_experiment(config, str(tmp_path))
  rows = {r['variant']: r for r in results['variants']}
  assert set(rows) == {'vanilla', 'ode_rk2_gated', 'pc_rk2', 'pc_rk4', 'vanilla_deep', 'harpe'}
  assert [rows[v]['block_evals_per_token'] for v in ('vanilla', 'pc_rk2', 'pc_rk4')] == [2, 6, 10]
  for row in rows.values():
    assert row['eval']['loss'] < 3.0  # far below a uniform byte model (ln 259 = 5.6)
  assert len(results['retrieval']['harpe']['by_length']) == 4


def _tiny_reproduction(setting: str, arg: str = ''):
  config = load_config(f'{CONFIG}:{setting}{arg}')
  config.parallel.num_devices = 1
  config.data.update(seq_len=32, eval_batch_size=8, eval_batches=1)
  for model in config.models.values():
    model.update(d_model=16, d_ff=32, num_heads=2, num_kv_heads=2, num_layers=2)
  config.train.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2, progress=False)
  config.train.async_checkpoint = False
  return config


def test_reproduction_setting_pairs_every_variant_with_vanilla_over_seeds(tmp_path):
  """The repro setting: 3 training seeds, vanilla at equal parameters and at 3x the steps (which
  follows an overridden train.steps), a paired difference table over the seeds."""
  for setting in ('repro', 'gpu'):
    full = load_config(f'{CONFIG}:{setting}')
    assert full.seeds == (0, 1, 2) and full.models.pc_rk2.num_layers >= 6
    variants = ['vanilla', 'pc_rk2', 'vanilla_3x_steps']
    variants[1:1] = ['ode_rk2_gated'] if setting == 'gpu' else []
    assert full.stages.split(',') == variants
    assert full.stage.vanilla_3x_steps.train.steps == 3 * full.train.steps
  config = _tiny_reproduction('repro', ',seeds=0+1,stages=vanilla+pc_rk2+vanilla_3x_steps')
  assert config.stage.vanilla_3x_steps.train.steps == 6
  results = run_experiment(config, str(tmp_path))
  assert results['seeds']['training'] == [0, 1]
  runs = results['runs']
  for name in ('pc_rk2', 'vanilla_3x_steps'):
    row = next(r for r in results['differences_to_vanilla'] if r['variant'] == name)
    diffs = [runs[s][name]['eval']['loss'] - runs[s]['vanilla']['eval']['loss'] for s in runs]
    assert row['mean'] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert row['std'] == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)
    assert row['lower'] == sum(d < 0 for d in diffs)
  first = runs[next(iter(runs))]
  steps = {name: first[name]['summary']['steps'] for name in first}
  assert steps == {'vanilla': 2, 'pc_rk2': 2, 'vanilla_3x_steps': 6}
  assert 'minus vanilla on the same training seed' in (tmp_path / 'results.md').read_text()


def test_gpu_setting_builds_and_runs_a_few_steps_on_cpu(tmp_path):
  config = _tiny_reproduction('gpu', ',seeds=0,stages=pc_rk2')
  results = run_experiment(config, str(tmp_path))
  assert results['variants'][0]['step'] == 2
