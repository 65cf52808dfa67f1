"""The Top-P MoE experiment: aux-loss weighting, experts-per-token evaluation, configs (the paper's
parameter counts), a tiny end-to-end run with its table and plots, and the notebook."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import topp_moe
from kuaijax import parallel
from kuaijax.config_lib import load_config
from kuaijax.evals.moe_stats import MoEStatsEvaluator
from kuaijax.main import run_experiment
from kuaijax.models.transformer import Transformer, TransformerConfig
from kuaijax.train import lm_task
from kuaijax.train.metrics import read_metrics
from tests.colab_test import PNG_MAGIC, execute_notebook
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/topp_moe/compare.py')
TASKS = ('code', 'arith', 'copy', 'recall')


def tiny_config(variants='top2,topp', steps=4):
  """The runlocal comparison shrunk to seconds (same shrinking as the notebook's TINY)."""
  config = load_config(CONFIG + ':runlocal')
  config.parallel.num_devices = 1
  config.run_variants = variants
  config.data.update(seq_len=128, eval_batch_size=16, eval_batches=4)
  config.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64)
  config.moe_layer.update(num_experts=4, expert_d_ff=64)
  config.variants.dense_wide.update(d_model=40, num_heads=2, num_kv_heads=1, d_ff=80)
  config.train.update(
    steps=steps,
    batch_size=4,
    log_every=2,
    eval_every=steps,
    checkpoint_every=steps,
    progress=False,
    async_checkpoint=False,
  )
  return config


def test_aux_loss_total_weights_mean_or_sum_and_keeps_vectors_out():
  layers = [
    {},
    {'balance_loss': 1.0, 'entropy_loss': 0.5, 'mean_k': 2.0, 'k_hist': jnp.ones(3)},
    {
      'balance_loss': 2.0,
      'entropy_loss': 1.5,
      'mean_k': 1.0,
      'experts_per_token': jnp.ones((2, 3)),
    },
  ]
  weights = {'balance_loss': 0.1, 'entropy_loss': 0.01}
  total, metrics = lm_task.aux_loss_total(layers, weights)
  assert float(total) == pytest.approx(0.1 * 1.5 + 0.01 * 1.0)
  total, metrics_sum = lm_task.aux_loss_total(layers, weights, reduce='sum')
  assert float(total) == pytest.approx(0.1 * 3.0 + 0.01 * 2.0)
  assert metrics == metrics_sum  # the reported values are layer means either way
  assert metrics['aux/balance_loss'] == pytest.approx(1.5)
  assert metrics['aux/mean_k'] == pytest.approx(1.5)
  assert metrics['moe/layer1/mean_k'] == 2.0 and metrics['moe/layer2/entropy_loss'] == 1.5
  assert all(np.ndim(v) == 0 for v in metrics.values())
  assert not any('k_hist' in k or 'experts_per_token' in k for k in metrics)
  assert lm_task.aux_loss_total([{}, {}], weights) == (0.0, {})
  with pytest.raises(ValueError, match='aux_reduce'):
    lm_task.aux_loss_total(layers, weights, reduce='max')


def test_moe_stats_evaluator_matches_a_direct_count():
  config = tiny_config()
  sub = topp_moe.variant_config(config, 'topp')
  model = Transformer(TransformerConfig.from_config(sub.model), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    batches.append(
      {
        'inputs': rng.integers(0, 300, (4, 16)).astype(np.int32),
        'targets': rng.integers(0, 300, (4, 16)).astype(np.int32),
        'positions': np.tile(np.arange(16, dtype=np.int32), (4, 1)),
        'segment_ids': np.ones((4, 16), np.int32),
        'loss_mask': (rng.random((4, 16)) < 0.7).astype(np.float32),
        'task_ids': rng.integers(0, 4, (4, 16)).astype(np.int32),
      }
    )
  mesh = parallel.mesh_from_config(config.parallel)
  got = MoEStatsEvaluator(batches, TASKS, mesh=mesh, rules=config.parallel.rules)(model)
  ks, masks, tasks = [], [], []
  per_token = nnx.jit(
    lambda m, b: [
      a['experts_per_token']
      for a in m(b['inputs'], positions=b['positions'], segment_ids=b['segment_ids'])[1]['mlp_aux']
    ]
  )
  for b in batches:
    ks.append(np.stack([np.asarray(k) for k in per_token(model, b)]))
    masks.append(b['loss_mask'] > 0)
    tasks.append(b['task_ids'])
  k = np.concatenate(ks, axis=1)  # [layers, tokens...]
  mask, task = np.concatenate(masks), np.concatenate(tasks)
  assert got['experts_per_token'] == pytest.approx(k[:, mask].mean(), rel=1e-6)
  for layer in range(2):
    assert got[f'moe/layer{layer}/mean_k'] == pytest.approx(k[layer][mask].mean(), rel=1e-6)
    hist = np.bincount(k[layer][mask].astype(int), minlength=5) / mask.sum()
    np.testing.assert_allclose(got[f'moe/layer{layer}/k_hist'], hist, rtol=1e-6)
    assert len(got[f'moe/layer{layer}/expert_load']) == 4
  for t, name in enumerate(TASKS):
    sel = mask & (task == t)
    assert got[f'experts_per_token/{name}'] == pytest.approx(k[:, sel].mean(), rel=1e-6)
  dense = Transformer(
    TransformerConfig.from_config(topp_moe.variant_config(config, 'dense').model),
    rngs=nnx.Rngs(0),
  )
  assert MoEStatsEvaluator(batches, TASKS, mesh=mesh, rules=config.parallel.rules)(dense) == {}


def test_variant_config_merges_moe_options_and_rejects_bad_names():
  config = load_config(CONFIG + ':runlocal')
  top2 = topp_moe.variant_config(config, 'top2').model
  assert top2.mlp == 'moe'
  assert top2.mlp_options.to_dict() == dict(
    num_experts=8,
    expert_d_ff=192,
    dispatch='auto',
    k_max=None,
    routing='top_k',
    k=2,
    renormalize=True,
  )
  assert topp_moe.variant_config(config, 'dense').model.mlp_options.to_dict() == {}
  assert config.model.mlp == 'swiglu'  # the base config is left alone
  config.run_variants = 'dense,top3'
  with pytest.raises(ValueError, match="run_variants='top3'"):
    topp_moe.variant_names(config)
  with config.unlocked():
    config.variants.dense.mlp_options = {'k': 2}
  with pytest.raises(ValueError, match='variants.dense.mlp_options'):
    topp_moe.variant_config(config, 'dense')
  sweep = load_config(CONFIG + ':runlocal,suite=p_sweep')
  assert sweep.run_variants.split(',')[0] == 'top2'
  ps = [sweep.variants[n].mlp_options.p for n in sweep.run_variants.split(',')[1:]]
  assert ps == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
  with pytest.raises(ValueError, match='suite'):
    load_config(CONFIG + ':suite=top3')


def test_full_scale_config_reproduces_the_paper_parameter_counts():
  config = load_config(CONFIG)
  assert (config.model.num_layers, config.model.d_model, config.model.num_heads) == (24, 1024, 16)
  assert config.moe_layer.num_experts == 16 and config.variants.topp.mlp_options.p == 0.4
  assert (config.data.seq_len, config.train.batch_size) == (2048, 2048)
  assert config.train.steps * 2048 * 2048 == pytest.approx(100e9, rel=1e-4)
  assert (config.optimizer.lr, config.optimizer.min_lr_ratio) == (3e-4, 0.1)
  assert (config.moe_loss.balance_weight, config.moe_loss.entropy_weight) == (1e-2, 1e-4)

  def counts(name, mean_k=None):
    sub = topp_moe.variant_config(config, name)
    factory = lm_task.model_factory(sub.model)
    model = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    ev = {f'moe/layer{i}/mean_k': mean_k for i in range(24)}
    return topp_moe.parameter_counts(params, ev)

  # Paper: Dense 374M, Dense 570M, Top-2 3.5B total / ~581M active.
  assert counts('dense')['total'] / 1e6 == pytest.approx(374, rel=0.01)
  assert counts('dense_wide')['total'] / 1e6 == pytest.approx(570, rel=0.01)
  top2 = counts('top2', mean_k=2.0)
  assert top2['total'] / 1e9 == pytest.approx(3.5, rel=0.01)
  assert top2['active'] / 1e6 == pytest.approx(581, rel=0.01)


def test_tiny_experiment_writes_table_plots_and_stats(tmp_path):
  config = tiny_config()
  piqa = tmp_path / 'piqa_validation.jsonl'
  records = [
    {'goal': 'Open a jar', 'sol1': 'twist the lid', 'sol2': 'eat the lid', 'label': 0},
    {'goal': 'Dry hands', 'sol1': 'use water', 'sol2': 'use a towel', 'label': 1},
    {'goal': 'Boil water', 'sol1': 'heat it', 'sol2': 'freeze it', 'label': 0},
  ]
  piqa.write_text('\n'.join(json.dumps(r) for r in records))
  config.evals.mc.update(
    tasks=(dict(name='piqa', source=str(piqa), format='piqa'),), max_len=32, batch_size=4
  )
  results = run_experiment(config, str(tmp_path))
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['tokens_per_variant'] == 4 * 4 * 128
  rows = saved['variants']
  assert list(rows) == list(results['variants']) == ['top2', 'topp']
  table = (tmp_path / 'results.md').read_text()
  for name in rows:
    assert f'| {name} |' in table
    assert rows[name]['step'] == 4
    for task in TASKS:
      assert 0 < rows[name]['eval'][f'loss/{task}'] < 10
  for task in TASKS:
    assert rows['top2']['eval'][f'experts_per_token/{task}'] == pytest.approx(2.0)
    assert 1.0 <= rows['topp']['eval'][f'experts_per_token/{task}'] <= 4.0
  assert rows['top2']['active_vs_top2'] == pytest.approx(1.0)
  for row in rows.values():
    assert row['eval']['count/piqa'] == 3 and row['eval']['acc/piqa'] in (0.0, 1 / 3, 2 / 3, 1.0)
  assert 'multiple-choice accuracy' in table and '| piqa | average |' in table
  assert rows['top2']['params']['total'] == rows['topp']['params']['total']
  assert sorted(rows['topp']['layer_mean_k']) == ['0', '1']  # JSON keys
  for png in ('mean_k_per_layer.png', 'mean_k_over_steps.png', 'loss_curves.png'):
    data = (tmp_path / png).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
  records = read_metrics(str(tmp_path / 'topp'))
  train = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train] == [2, 4]
  assert all(isinstance(r['moe/layer1/mean_k'], float) for r in train)
  assert not any('k_hist' in k for r in train for k in r)
  last_eval = [r for r in records if 'eval/loss' in r][-1]
  assert len(last_eval['eval/moe/layer0/k_hist']) == 5  # k = 0..k_max (4)
  assert rows['topp']['mean_k_curve'] == [[r['step'], r['aux/mean_k']] for r in train]


def test_notebook_runs_the_comparison(tmp_path):
  workdir = tmp_path / 'workdir'
  nb = execute_notebook(
    'topp_moe.ipynb',
    tmp_path,
    KUAIJAX_NOTEBOOK_STEPS='2',
    KUAIJAX_NOTEBOOK_VARIANTS='topp',
    KUAIJAX_NOTEBOOK_TINY='1',
    KUAIJAX_NOTEBOOK_WORKDIR=str(workdir),
  )
  results = json.loads((workdir / 'results.json').read_text())
  assert list(results['variants']) == ['topp']
  assert '| topp |' in (workdir / 'results.md').read_text()
  shown = [
    o
    for cell in nb.cells
    for o in cell.get('outputs', [])
    if o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
  ]
  assert len(shown) == 2, 'both plots are shown'


@pytest.mark.slow
def test_full_runlocal_comparison(tmp_path):
  config = load_config(CONFIG + ':runlocal')
  config.train.progress = False
  results = run_experiment(config, str(tmp_path))
  rows = results['variants']
  assert list(rows) == ['dense', 'dense_wide', 'top1', 'top2', 'topp']
  for name, row in rows.items():
    assert row['step'] == config.train.steps
    assert row['eval']['loss'] < np.log(256) - 1.0, name  # far below a uniform byte model
  topp = rows['topp']['eval']
  assert 1.0 <= topp['experts_per_token'] <= 4.0
  assert rows['top1']['params']['total'] == rows['topp']['params']['total']
  assert (tmp_path / 'mean_k_per_layer.png').exists()
