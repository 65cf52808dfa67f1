"""Scaling-law fits (closed forms), the compute frontier, the cell grid (model roles and pretrain
stages), the tables/plots, and a tiny grid end to end."""

import json
import os

import numpy as np
import pytest

from experiments import scaling
from kuaijax import scaling_laws
from kuaijax.config_lib import load_config
from kuaijax.main import run_experiment
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/scaling/dense_vs_moe.py')


def test_fit_recovers_an_exact_power_law():
  x = np.geomspace(1e3, 1e6, 6)
  fit = scaling_laws.fit_power_law(x, 1.7 + 40.0 * x**-0.35)
  assert fit['E'] == pytest.approx(1.7, abs=2e-3)
  assert fit['alpha'] == pytest.approx(0.35, abs=2e-3)
  assert fit['A'] == pytest.approx(40.0, rel=2e-2)
  assert fit['r2'] > 0.99999
  with pytest.raises(ValueError, match='at least 3 points, got 2'):
    scaling_laws.fit_power_law([1, 2], [3, 4])


def test_bootstrap_interval_covers_the_truth_on_noisy_data():
  rng = np.random.default_rng(1)
  x = np.geomspace(1e3, 1e6, 8)
  y = 2.0 + 25.0 * x**-0.3 + rng.normal(0, 0.005, x.shape)
  fit = scaling_laws.fit_power_law(x, y)
  ci = scaling_laws.bootstrap_ci(x, y, fit, samples=100)
  for key, truth in (('E', 2.0), ('alpha', 0.3)):
    assert ci[key][0] <= truth <= ci[key][1], (key, ci[key])
    assert ci[key][0] <= fit[key] <= ci[key][1]


def test_compute_frontier_keeps_the_best_loss_so_far():
  points = [(4, 2.0), (1, 3.0), (2, 3.5), (3, 2.5), (5, 2.2), (6, 1.9)]
  assert scaling_laws.compute_frontier(points) == ([1, 3, 4, 6], [3.0, 2.5, 2.0, 1.9])


def test_grid_has_five_sizes_per_family_as_roles_and_stages():
  config = load_config(CONFIG + ':runlocal')
  cells = scaling.grid(config)
  assert len(cells) == 15 and config.stages == ','.join(cells)
  assert cells[:5] == [f'dense_s{i}' for i in range(1, 6)]
  block, model = config.stage.top2_s3, config.models.top2_s3
  assert (block.type, block.model, block.family, block.size) == (
    'pretrain',
    'top2_s3',
    'top2',
    's3',
  )
  assert block.aux_loss.balance_weight == 1e-2
  assert (model.d_model, model.num_heads, model.num_kv_heads, model.d_ff) == (32, 4, 4, 64)
  assert model.mlp == 'moe' and model.mlp_options.expert_d_ff == 32
  assert model.mlp_options.num_experts == 8 and model.mlp_options.k == 2
  assert config.models.dense_s3.mlp == 'swiglu' and config.models.topp_s3.mlp_options.p == 0.4
  picked = load_config(CONFIG + ':runlocal,cells=top2_s3+dense_s1,seeds=0+1')
  assert picked.stages == 'top2_s3,dense_s1' and picked.seeds == (0, 1)
  assert len(scaling.grid(picked)) == 15  # the fits still wait for the whole grid
  assert len(scaling.grid(load_config(CONFIG))) == 18


def test_tiny_grid_trains_the_picked_cells_then_fits_every_family(tmp_path):
  """The (shrunk) gpu setting over two training seeds: picked cells first, the fits once the grid is
  done; the per-seed MoE-minus-dense differences at equal compute are the single-seed fits'
  differences (re-run on the finished cells)."""
  config = load_config(CONFIG + ':runlocal,cells=dense_s1+nope')
  with pytest.raises(ValueError, match="stage 'nope' has no block"):
    run_experiment(config, str(tmp_path))
  config = load_config(CONFIG + ':gpu,cells=dense_s1,seeds=0+1')
  config.parallel.num_devices = 1
  config.data.update(seq_len=32, eval_batch_size=8, eval_batches=1)
  config.train.update(steps=2, batch_size=2, log_every=1, eval_every=1, checkpoint_every=2)
  config.train.async_checkpoint = False
  with config.unlocked():  # a 2 x 3 grid (3 sizes: the fewest a fit takes)
    for name in [n for n in config.stage if n.startswith('topp') or n[-1] in '45']:
      del config.stage[name], config.models[name]
  results = run_experiment(config, str(tmp_path))
  assert sorted(results['missing_cells']) == [
    'dense_s2',
    'dense_s3',
    'top2_s1',
    'top2_s2',
    'top2_s3',
  ]
  assert list(results['train_seconds']) == ['dense_s1']
  assert not (tmp_path / 'results.json').exists()
  config.stages = ','.join(scaling.grid(config))
  results = run_experiment(config, str(tmp_path))
  assert [r['family'] for r in results['runs']] == ['dense'] * 3 + ['top2'] * 3
  assert set(results['fits']) == {'dense', 'top2'} and results['equal_compute']
  stages = [
    json.loads((tmp_path / f'seed_{s}' / 'top2_s2' / 'stage.json').read_text()) for s in (0, 1)
  ]
  stage, top2 = stages[0], results['runs'][4]
  assert top2['loss'] == pytest.approx(np.mean([s['eval']['loss'] for s in stages]))
  assert len(top2['curve']) == 2
  assert top2['params_total'] == stage['summary']['params']['total'] > top2['active_non_embedding']
  assert results['seeds'] == {'training': [0, 1], 'sampling': []}
  table = (tmp_path / 'results.md').read_text()
  assert 'mean ± std over 2 training seeds' in table and 'top2 - dense (per seed)' in table
  per_seed = results['minus_dense_per_seed']
  assert len(per_seed) == 3
  single = []
  for seed in (0, 1):
    config.seeds = (seed,)
    alone = run_experiment(config, str(tmp_path))  # finished cells: fits only
    assert alone['minus_dense_per_seed'] == {}
    single.append(alone['minus_dense_at_compute'])
  assert '1 training seed' in (tmp_path / 'results.md').read_text()
  for budget, row in per_seed.items():
    diffs = [s[budget]['top2'][0] for s in single]
    assert row['top2']['mean'] == pytest.approx(np.mean(diffs), abs=1e-9)
    assert row['top2']['std'] == pytest.approx(np.std(diffs, ddof=1), abs=1e-9)
    assert row['top2']['lower'] == sum(d < 0 for d in diffs)


def test_fits_table_and_plots_from_records(tmp_path):
  records = []
  for family, (e, a) in {'dense': (2.0, 30.0), 'top2': (1.8, 30.0)}.items():
    for n in (1e3, 3e3, 1e4, 3e4, 1e5):
      loss = e + a * n**-0.4
      curve = [(6 * n * t, e + a * n**-0.4 + 1.0 / t) for t in (1.0, 2.0, 4.0)]
      records.append(
        dict(
          family=family,
          d_model=8,
          num_layers=2,
          params_total=int(4 * n),
          active_non_embedding=n,
          loss=loss,
          compute=curve[-1][0],
          tokens=4.0,
          curve=curve,
        )
      )
  fits = scaling_laws.fit_families(records, ['dense', 'top2'])
  assert fits['dense']['L(N)']['alpha'] == pytest.approx(0.4, abs=2e-3)
  budgets = scaling_laws.dense_budgets(records)
  comparison = scaling_laws.equal_compute(fits, budgets)
  assert len(comparison) == 5
  assert all(row['top2'] < row['dense'] for row in comparison.values())
  differences = scaling_laws.difference_at_compute(fits, budgets)
  for c, row in comparison.items():
    point, low, high = differences[c]['top2']
    assert point == pytest.approx(row['top2'] - row['dense'])
    assert low <= point <= high < 0  # the frontiers differ by a constant 0.2: the interval says so
  md = scaling.table(records, fits, comparison, 'synthetic', differences)
  assert '| dense | L(N) | 2 [' in md and 'L_top2(C)' in md and 'top2 - dense (fit)' in md
  paths = scaling.plot(records, fits, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['loss_vs_params.png', 'loss_vs_compute.png']
  assert all(os.path.getsize(p) > 1000 for p in paths)


def test_reproduction_settings():
  """repro / gpu: 3 training seeds, >= 20 training tokens per activated parameter of the largest
  dense cell."""
  for setting in ('repro', 'gpu'):
    full = load_config(f'{CONFIG}:{setting}')
    assert full.seeds == (0, 1, 2) and len(scaling.grid(full)) == 15
    largest = full.models.dense_s5
    n = largest.num_layers * (4 * largest.d_model**2 + 3 * largest.d_model * largest.d_ff)
    assert full.train.steps * full.train.batch_size * full.data.seq_len >= 20 * n
  with pytest.raises(ValueError, match='alternatives'):
    load_config(CONFIG + ':repro,runlocal')
