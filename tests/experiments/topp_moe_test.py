"""The Top-P MoE experiment: aux-loss weighting, experts-per-token evaluation, configs (the paper's
parameter counts; variants as model roles and pretrain stages), a tiny end-to-end run with its table
and plots, SIGKILL in the second stage, and the notebook."""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax import config_lib, parallel
from kuaijax.config_lib import load_config
from kuaijax.evals import moe_stats
from kuaijax.evals.moe_stats import MoEStatsEvaluator
from kuaijax.main import run_experiment
from kuaijax.models.transformer import Transformer, TransformerConfig
from kuaijax.train import lm_task
from kuaijax.train.metrics import read_metrics
from tests import sigkill
from tests.colab_test import PNG_MAGIC, execute_notebook
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/topp_moe/compare.py')
TASKS = ('code', 'arith', 'copy', 'recall')


TINY_MODEL = dict(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64)
TINY_LAYER = dict(num_experts=4, expert_d_ff=64)
TINY_WIDE = dict(d_model=40, num_heads=2, num_kv_heads=1, d_ff=80)


def shrink(config):
  """Every variant's role at the tiny size (as the notebook's TINY): MoE layers of 4 experts."""
  for name, model in config.models.items():
    model.update(TINY_MODEL if name != 'dense_wide' else {**TINY_MODEL, **TINY_WIDE})
    if model.mlp == 'moe':
      model.mlp_options.update(TINY_LAYER)


def tiny_config(variants='top2,topp', steps=4):
  """The runlocal comparison shrunk to seconds (same shrinking as the notebook's TINY)."""
  config = load_config(CONFIG + ':runlocal')
  config.parallel.num_devices = 1
  config.stages = variants
  config.data.update(seq_len=128, eval_batch_size=16, eval_batches=4)
  shrink(config)
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
  model = Transformer(TransformerConfig.from_config(config.models.topp), rngs=nnx.Rngs(0))
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
  dense = Transformer(TransformerConfig.from_config(config.models.dense), rngs=nnx.Rngs(0))
  assert MoEStatsEvaluator(batches, TASKS, mesh=mesh, rules=config.parallel.rules)(dense) == {}


def test_variants_are_model_roles_and_pretrain_stages():
  config = load_config(CONFIG + ':runlocal')
  assert config.stages == 'dense,dense_wide,top1,top2,topp' and config.seeds == (0,)
  assert list(config.models) == list(config.stage) == config.stages.split(',')
  for name, block in config.stage.items():
    assert (block.type, block.model, block.init_from) == ('pretrain', name, '')
    assert block.aux_loss.to_dict() == config_lib.moe_aux_loss()  # balance 1e-2, entropy 1e-4
  top2 = config.models.top2
  assert top2.mlp == 'moe'
  assert top2.mlp_options.to_dict() == dict(
    num_experts=8,
    expert_d_ff=192,
    dispatch='auto',
    k_max=0,
    routing='top_k',
    k=2,
    renormalize=True,
  )
  assert config.models.dense.mlp_options.to_dict() == {}
  assert config.models.dense_wide.d_model == 120 and config.models.topp.d_model == 96
  with pytest.raises(ValueError, match='variant dense: mlp_options'):
    config_lib.moe_model(
      config.models.dense, dict(mlp='swiglu', mlp_options={'k': 2}), {}, name='variant dense'
    )
  sweep = load_config(CONFIG + ':runlocal,suite=p_sweep,seeds=0+1+2')
  assert sweep.stages.split(',')[0] == 'top2' and sweep.seeds == (0, 1, 2)
  ps = [sweep.models[n].mlp_options.p for n in sweep.stages.split(',')[1:]]
  assert ps == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
  with pytest.raises(ValueError, match='suite'):
    load_config(CONFIG + ':suite=top3')


def test_reproduction_settings():
  """repro / gpu: 3 training seeds of dense / Top-2 / Top-P with >= 2M tokens per variant; the p
  sweep and the ablations at one seed, each differing from Top-P in one thing."""
  for setting, min_tokens in (('repro', 2e6), ('gpu', 1.6e7)):
    config = load_config(f'{CONFIG}:{setting}')
    assert config.stages == 'dense,top2,topp' and config.seeds == (0, 1, 2)
    tokens = config.train.steps * config.train.batch_size * config.data.seq_len
    assert tokens >= min_tokens
    assert config.models.topp.mlp_options.k_max == 0 and config.models.topp.mlp_options.p == 0.4
  ablation = load_config(CONFIG + ':repro,suite=ablation')
  assert ablation.stages == 'topp,topp_no_entropy,topp_renormalized' and ablation.seeds == (0,)
  assert ablation.models.topp.to_dict() == ablation.models.topp_no_entropy.to_dict()
  renormalized = ablation.models.topp_renormalized.to_dict()
  assert renormalized['mlp_options'].pop('renormalize') is True
  assert renormalized == ablation.models.topp.to_dict()
  weights = {name: ablation.stage[name].aux_loss.to_dict() for name in ('topp', 'topp_no_entropy')}
  assert weights['topp'] == {**weights['topp_no_entropy'], 'entropy_weight': 1e-4}
  assert weights['topp_no_entropy']['entropy_weight'] == 0.0
  assert load_config(CONFIG + ':repro,suite=p_sweep').stages.split(',')[0] == 'top2'
  with pytest.raises(ValueError, match='alternatives'):
    load_config(CONFIG + ':repro,gpu')


def test_reproduction_report_pairs_topp_with_top2_over_seeds(tmp_path):
  """Two training seeds of the (shrunk) gpu setting: the paired Top-P - Top-2 differences, the
  Spearman and per-layer expert counts with their spread over seeds, the mean-k curve over seeds."""
  config = load_config(CONFIG + ':gpu,seeds=0+1')
  config.parallel.num_devices = 1
  config.stages = 'top2,topp'
  config.data.update(seq_len=64, eval_batch_size=8, eval_batches=1)
  shrink(config)
  config.train.update(
    steps=2, log_every=1, eval_every=2, checkpoint_every=2, progress=False, batch_size=4
  )
  config.train.async_checkpoint = False
  results = run_experiment(config, str(tmp_path))
  runs, rows = results['runs'], results['variants']
  assert results['seeds']['training'] == [0, 1]
  (row,) = results['differences_to_top2']
  diffs = [runs[s]['topp']['eval']['loss'] - runs[s]['top2']['eval']['loss'] for s in runs]
  assert row['mean'] == pytest.approx(np.mean(diffs), abs=1e-12)
  assert row['std'] == pytest.approx(np.std(diffs, ddof=1), abs=1e-12)
  per_seed = [runs[s]['topp']['eval']['moe/layer0/mean_k'] for s in runs]
  assert rows['topp']['layer_mean_k_std'][0] == pytest.approx(np.std(per_seed, ddof=1))
  curves = [
    {
      r['step']: r['aux/mean_k']
      for r in read_metrics(str(tmp_path / f'seed_{s}' / 'topp'))
      if 'aux/mean_k' in r
    }
    for s in (0, 1)
  ]
  for step, mean, std in rows['topp']['mean_k_curve']:
    assert mean == pytest.approx((curves[0][step] + curves[1][step]) / 2)
    assert std == pytest.approx(np.std([curves[0][step], curves[1][step]], ddof=1))
  table = (tmp_path / 'results.md').read_text()
  assert 'mean ± std over 2 training seeds' in table and 'lower than top2 on' in table


def test_unknown_variant_is_named(tmp_path):
  config = tiny_config(variants='dense,top3')
  with pytest.raises(ValueError, match="stage 'top3' has no block"):
    run_experiment(config, str(tmp_path))


def test_full_scale_config_reproduces_the_paper_parameter_counts():
  config = load_config(CONFIG)
  topp = config.models.topp
  assert (topp.num_layers, topp.d_model, topp.num_heads) == (24, 1024, 16)
  assert topp.mlp_options.num_experts == 16 and topp.mlp_options.p == 0.4
  assert (config.data.seq_len, config.train.batch_size) == (2048, 2048)
  assert config.train.steps * 2048 * 2048 == pytest.approx(100e9, rel=1e-4)
  assert (config.optimizer.lr, config.optimizer.min_lr_ratio) == (3e-4, 0.1)
  aux = config.stage.topp.aux_loss
  assert (aux.balance_weight, aux.entropy_weight) == (1e-2, 1e-4)

  def counts(name, mean_k=None):
    factory = lm_task.model_factory(config.models[name])
    model = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    ev = {} if mean_k is None else {f'moe/layer{i}/mean_k': mean_k for i in range(24)}
    return moe_stats.parameter_counts(params, ev)

  # Paper: Dense 374M, Dense 570M, Top-2 3.5B total / ~581M active.
  assert counts('dense')['total'] / 1e6 == pytest.approx(374, rel=0.01)
  assert counts('dense_wide')['total'] / 1e6 == pytest.approx(570, rel=0.01)
  top2 = counts('top2', mean_k=2.0)
  assert top2['total'] / 1e9 == pytest.approx(3.5, rel=0.01)
  assert top2['active'] / 1e6 == pytest.approx(581, rel=0.01)
  assert counts('top2')['active'] is None  # mean k not measured
  assert counts('dense')['active'] == counts('dense')['total']


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
  assert saved['seeds'] == {'training': [0], 'sampling': []}
  rows = saved['variants']
  assert list(rows) == list(results['variants']) == ['top2', 'topp']
  table = (tmp_path / 'results.md').read_text()
  for name in rows:
    assert f'| {name} |' in table
    assert rows[name]['step'] == 4
    ev = rows[name]['eval']
    # The per-task losses split the overall one: their token-weighted mean is the loss.
    tokens = [ev[f'tokens/{task}'] for task in TASKS]
    weighted = sum(ev[f'loss/{task}'] * n for task, n in zip(TASKS, tokens)) / sum(tokens)
    assert min(tokens) > 0 and weighted == pytest.approx(ev['loss'], rel=1e-5)
  for task in TASKS:
    assert rows['top2']['eval'][f'experts_per_token/{task}'] == pytest.approx(2.0)
    assert 1.0 <= rows['topp']['eval'][f'experts_per_token/{task}'] <= 4.0
  assert rows['top2']['active_vs_top2'] == pytest.approx(1.0)
  for row in rows.values():
    assert row['eval']['count/piqa'] == 3 and row['eval']['acc/piqa'] in (0.0, 1 / 3, 2 / 3, 1.0)
  assert 'multiple-choice accuracy' in table and '| piqa | average |' in table
  assert '1 training seed' in table and '±' not in table
  for name in rows:
    stage = json.loads((tmp_path / 'seed_0' / name / 'stage.json').read_text())
    assert stage['type'] == 'pretrain' and stage['model'] == name
    assert rows[name]['eval'] == {k: v for k, v in stage['eval'].items() if not isinstance(v, list)}
  assert rows['top2']['params']['total'] == rows['topp']['params']['total']
  assert sorted(rows['topp']['layer_mean_k']) == ['0', '1']  # JSON keys
  for png in ('mean_k_per_layer.png', 'mean_k_over_steps.png', 'loss_curves.png'):
    data = (tmp_path / png).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
  records = read_metrics(str(tmp_path / 'seed_0' / 'topp'))
  train = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train] == [2, 4]
  assert all(isinstance(r['moe/layer1/mean_k'], float) for r in train)
  assert not any('k_hist' in k for r in train for k in r)
  last_eval = [r for r in records if 'eval/loss' in r][-1]
  assert len(last_eval['eval/moe/layer0/k_hist']) == 5  # k = 0..k_max (4)
  assert rows['topp']['mean_k_curve'] == [[r['step'], r['aux/mean_k'], None] for r in train]
  assert 'Mean experts per token during training' in table
  (difference,) = saved['differences_to_top2']
  loss = {name: rows[name]['eval']['loss'] for name in rows}
  assert difference['variant'] == 'topp' and difference['seeds'] == 1
  assert difference['mean'] == pytest.approx(loss['topp'] - loss['top2'], abs=1e-12)
  assert 'loss minus top2 on the same training seed' in table
  for layer in ('0', '1'):
    assert 1 <= rows['topp']['layer_max_k'][layer] <= 4
    # Left out where undefined (a near-uniform router at init gives every token the same k).
    for rhos in rows['topp']['layer_spearman'].values():
      assert -1 <= rhos.get(layer, 0.0) <= 1
  assert rows['top2']['layer_spearman']['all'] == {}  # k is constant: undefined
  assert 'Spearman rank correlation' in table
  assert (tmp_path / 'loss_k_spearman.png').read_bytes().startswith(PNG_MAGIC)


def test_spearman_with_ties_matches_hand_computed_ranks():
  np.testing.assert_allclose(
    moe_stats.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1, 3.5, 2]
  )
  assert moe_stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert moe_stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # ranks (1, 2, 3, 4) vs (1.5, 1.5, 3, 4): Pearson of the ranks.
  expected = np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 3, 4])[0, 1]
  assert moe_stats.spearman([1, 2, 3, 4], [5, 5, 7, 9]) == pytest.approx(expected)
  assert moe_stats.spearman([1, 2, 3], [2, 2, 2]) is None


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
  assert len(shown) == len(results['plots']) >= 3, 'every plot is shown'


KILL_FLAGS = [
  '--config.parallel.num_devices=1',
  '--config.stages=top2,topp',
  '--config.data.seq_len=64',
  '--config.data.eval_batch_size=8',
  '--config.data.eval_batches=1',
  *(f'--config.models.{v}.{k}={x}' for v in ('top2', 'topp') for k, x in TINY_MODEL.items()),
  *(
    f'--config.models.{v}.mlp_options.{k}={x}'
    for v in ('top2', 'topp')
    for k, x in TINY_LAYER.items()
  ),
  '--config.train.steps=30',
  '--config.train.batch_size=4',
  '--config.train.log_every=1',
  '--config.train.eval_every=10',
  '--config.train.checkpoint_every=2',
  '--config.train.progress=False',
]


def _command(workdir):
  config = f'--config={CONFIG}:runlocal'
  return [sys.executable, '-m', 'kuaijax.main', config, f'--workdir={workdir}', *KILL_FLAGS]


def test_sigkill_in_the_second_variant_then_rerun_resumes_exactly(tmp_path):
  """A real SIGKILL of `python -m kuaijax.main` in the middle of the 'topp' stage (after its second
  checkpoint): re-running the command keeps the finished 'top2' stage untouched and ends with the
  losses and evaluation of an uninterrupted run, bit for bit."""
  sigkill.run(_command(tmp_path / 'straight'))
  killed = tmp_path / 'killed'
  sigkill.kill_after_checkpoints(_command(killed), killed / 'seed_0' / 'topp')
  assert not (killed / 'seed_0' / 'topp' / 'stage.json').exists(), 'topp finished before the kill'
  stamps = sigkill.file_stamps(killed / 'seed_0' / 'top2')
  sigkill.run(_command(killed))
  assert sigkill.file_stamps(killed / 'seed_0' / 'top2') == stamps  # top2 kept as it was
  for name in ('top2', 'topp'):
    straight = sigkill.stage_outcome(tmp_path / 'straight' / 'seed_0' / name)
    resumed = sigkill.stage_outcome(killed / 'seed_0' / name)
    assert [r['step'] for r in resumed[0] if 'loss' in r] == list(range(1, 31))
    assert straight == resumed, name
  results = [json.loads((w / 'results.json').read_text()) for w in (tmp_path / 'straight', killed)]
  assert results[0]['variants'] == results[1]['variants']


# Validation loss (all tasks) of the runlocal comparison as recorded in experiments/topp_moe/README.md
# (200 steps, training seed 0, one CPU device).
RECORDED_LOSS = {
  'dense': 2.2434,
  'dense_wide': 2.0409,
  'top1': 2.4799,
  'top2': 1.8709,
  'topp': 2.1062,
}
# The README's run with the same routing and gradients up to float summation order (dense
# dispatch) reached 2.0877 instead of 2.1062: 0.0185 apart. A rerun may differ by that much in
# rounding; 0.05 is 2.7 times that and under a third of the smallest gap between two variants'
# recorded losses that the README compares (top2 vs topp: 0.235).
LOSS_TOLERANCE = 0.05


def unigram_losses(config, workdir) -> dict:
  """The add-one-smoothed unigram model of the training split (first 5000 examples) scored on the
  same evaluation batches as the variants: the loss per task (`loss/<task>`) and over all tasks."""
  from kuaijax.data import pipeline
  from kuaijax.evals.lm_loss import unigram_baseline
  from kuaijax.stages import pretrain, roles

  cfg = roles.role_config(config, 'dense')
  data = lm_task.build_lm_data(cfg, str(workdir), tokenizer_dir=pretrain.tokenizer_dir(workdir))
  counts = pipeline.unigram_counts(data.train_source, data.tokenizer, max_examples=5000)
  return unigram_baseline(counts, data.eval_batches, data.task_names)


@pytest.mark.slow
def test_full_runlocal_comparison(tmp_path):
  config = load_config(CONFIG + ':runlocal')
  config.parallel.num_devices = 1  # as the recorded run (the suite simulates 8 devices)
  config.train.progress = False
  results = run_experiment(config, str(tmp_path))
  rows = results['variants']
  assert list(rows) == ['dense', 'dense_wide', 'top1', 'top2', 'topp']
  unigram = unigram_losses(config, tmp_path)
  for name, row in rows.items():
    assert row['step'] == config.train.steps
    for key in ('loss', *(f'loss/{task}' for task in TASKS)):
      assert row['eval'][key] < unigram[key], (name, key)  # learnt more than token frequencies
    assert row['eval']['loss'] == pytest.approx(RECORDED_LOSS[name], abs=LOSS_TOLERANCE), name
  topp = rows['topp']['eval']
  assert 1.0 <= topp['experts_per_token'] <= 4.0
  assert rows['top1']['params']['total'] == rows['topp']['params']['total']
  assert (tmp_path / 'mean_k_per_layer.png').exists()
