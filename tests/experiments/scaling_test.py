"""Scaling-law fits (closed forms), the compute frontier, the cell grid and the tables/plots."""

import os

import numpy as np
import pytest

from experiments import scaling
from kuaijax.config_lib import load_config
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/scaling/dense_vs_moe.py')


def test_fit_recovers_an_exact_power_law():
  x = np.geomspace(1e3, 1e6, 6)
  fit = scaling.fit_power_law(x, 1.7 + 40.0 * x**-0.35)
  assert fit['E'] == pytest.approx(1.7, abs=2e-3)
  assert fit['alpha'] == pytest.approx(0.35, abs=2e-3)
  assert fit['A'] == pytest.approx(40.0, rel=2e-2)
  assert fit['r2'] > 0.99999
  with pytest.raises(ValueError, match='at least 3 points, got 2'):
    scaling.fit_power_law([1, 2], [3, 4])


def test_bootstrap_interval_covers_the_truth_on_noisy_data():
  rng = np.random.default_rng(1)
  x = np.geomspace(1e3, 1e6, 8)
  y = 2.0 + 25.0 * x**-0.3 + rng.normal(0, 0.005, x.shape)
  fit = scaling.fit_power_law(x, y)
  ci = scaling.bootstrap_ci(x, y, fit, samples=100)
  for key, truth in (('E', 2.0), ('alpha', 0.3)):
    assert ci[key][0] <= truth <= ci[key][1], (key, ci[key])
    assert ci[key][0] <= fit[key] <= ci[key][1]


def test_compute_frontier_keeps_the_best_loss_so_far():
  points = [(4, 2.0), (1, 3.0), (2, 3.5), (3, 2.5), (5, 2.2), (6, 1.9)]
  assert scaling.compute_frontier(points) == ([1, 3, 4, 6], [3.0, 2.5, 2.0, 1.9])


def test_grid_has_five_sizes_per_family_and_cells_are_checked():
  config = load_config(CONFIG + ':runlocal')
  cells = scaling.cell_grid(config)
  assert len(cells) == 15
  assert [n for n, _ in cells[:5]] == [f'dense_s{i}' for i in range(1, 6)]
  name, overrides = cells[7]
  assert name == 'top2_s3' and overrides['run_variants'] == 'top2'
  assert overrides['model.d_model'] == 32 and overrides['moe_layer.expert_d_ff'] == 32
  config.cells = 'top2_s3,dense_s9'
  with pytest.raises(ValueError, match="unknown cells \\['dense_s9'\\]"):
    scaling.selected_cells(config, [n for n, _ in cells])
  assert len(scaling.cell_grid(load_config(CONFIG))) == 18


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
          curve=curve,
        )
      )
  fits = scaling.fit_families(records, ['dense', 'top2'])
  assert fits['dense']['L(N)']['alpha'] == pytest.approx(0.4, abs=2e-3)
  comparison = scaling.equal_compute(fits, records)
  assert len(comparison) == 5
  assert all(row['top2'] < row['dense'] for row in comparison.values())
  md = scaling.table(records, fits, comparison, 'synthetic')
  assert '| dense | L(N) | 2 [' in md and 'L_top2(C)' in md
  paths = scaling.plot(records, fits, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['loss_vs_params.png', 'loss_vs_compute.png']
  assert all(os.path.getsize(p) > 1000 for p in paths)
