"""Scaling laws of dense, Top-2 and Top-P MoE decoders trained on the same tokens.

Every cell (family x size) of the grid in the config is one `topp_moe` run of a single variant
(`config.base` is that experiment's config), planned and run by `kuaijax.sweep` into
`workdir/runs/<family>_<size>/`; finished cells are skipped, so the experiment resumes, and
`config.cells` limits a call to some cells (e.g. one cluster job per cell, same workdir). Once every
cell has finished, the experiment fits per family

  L(N) = E + A / N^alpha     (N: activated non-embedding parameters per token, final eval loss)
  L(C) = E + A / C^alpha     (C = 6 N D training FLOPs, on the family's compute frontier: the lowest
                              eval loss reached with at most C, over all sizes and eval steps)

with 95% residual-bootstrap confidence intervals, compares the families at equal compute, and writes
results.json, results.md, loss_vs_params.png and loss_vs_compute.png. For Top-P, N counts the
experts' weights times the measured mean experts per token of each layer (final evaluation).
"""

from __future__ import annotations

import importlib
import json
import math
import os

import jax
import numpy as np
from matplotlib.figure import Figure

from kuaijax import sweep
from kuaijax.results import write_results

ALPHAS = np.linspace(0.005, 2.0, 800)
FLOPS_PER_PARAM_TOKEN = 6


def _profile(x, y, alphas):
  """(sse, E, A_scaled) of the least-squares line y = E + A z with z = x^-alpha, for every alpha."""
  z = x[None, :] ** -alphas[:, None]
  zc = z - z.mean(axis=1, keepdims=True)
  yc = y - y.mean()
  slope = (zc @ yc) / np.maximum((zc**2).sum(axis=1), 1e-300)
  intercept = y.mean() - slope * z.mean(axis=1)
  sse = ((yc[None, :] - slope[:, None] * zc) ** 2).sum(axis=1)
  return sse, intercept, slope


def fit_power_law(x, y) -> dict:
  """Least-squares L = E + A x^-alpha: E and A are linear given alpha, so alpha is profiled on a grid
  (then refined twice on finer grids around the best value)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 3:
    raise ValueError(f'a power-law fit needs at least 3 points, got {len(x)}')
  scale = np.exp(np.mean(np.log(x)))  # x / scale keeps x^-alpha well conditioned
  xs, grid = x / scale, ALPHAS
  for _ in range(3):
    sse, intercept, slope = _profile(xs, y, grid)
    i = int(np.argmin(sse))
    alpha, step = float(grid[i]), grid[1] - grid[0]
    grid = np.linspace(max(alpha - step, 1e-4), alpha + step, 101)
  total = float(np.sum((y - y.mean()) ** 2))
  return {
    'E': float(intercept[i]),
    'A': float(slope[i] * scale**alpha),
    'alpha': alpha,
    'r2': 1.0 - float(sse[i]) / total if total > 0 else 1.0,
    'n': len(x),
  }


def predict(fit: dict, x):
  return fit['E'] + fit['A'] * np.asarray(x, np.float64) ** -fit['alpha']


def bootstrap_ci(x, y, fit: dict, *, samples: int = 300, seed: int = 0) -> dict:
  """95% intervals of E, A, alpha from refits to predictions plus resampled residuals."""
  rng = np.random.default_rng(seed)
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mean = predict(fit, x)
  residuals = y - mean
  draws = [fit_power_law(x, mean + rng.choice(residuals, len(x))) for _ in range(samples)]
  return {
    k: [
      float(np.percentile([d[k] for d in draws], 2.5)),
      float(np.percentile([d[k] for d in draws], 97.5)),
    ]
    for k in ('E', 'A', 'alpha')
  }


def compute_frontier(points) -> tuple[list[float], list[float]]:
  """The lowest loss reached with at most C FLOPs, at every C where it improves."""
  frontier_c, frontier_l, best = [], [], math.inf
  for c, loss in sorted(points):
    if loss < best:
      best = loss
      frontier_c.append(c)
      frontier_l.append(loss)
  return frontier_c, frontier_l


def cell_grid(config) -> list[tuple[str, dict]]:
  """[(cell name, overrides of the topp_moe base config)] for families x sizes, in order."""
  cells = []
  for family in [f.strip() for f in config.families.split(',') if f.strip()]:
    for size_name, size in config.sizes.items():
      overrides = {
        'run_variants': family,
        'model.d_model': size.d_model,
        'model.num_layers': size.num_layers,
        'model.num_heads': size.num_heads,
        'model.num_kv_heads': size.num_heads,
        'model.d_ff': size.d_ff,
        'moe_layer.expert_d_ff': size.expert_d_ff,
      }
      cells.append((f'{family}_{size_name}', overrides))
  return cells


def selected_cells(config, known: list[str]) -> set[str]:
  """The cells this call trains: `config.cells` (comma-separated names) or '' for all."""
  wanted = {c.strip() for c in config.cells.split(',') if c.strip()} or set(known)
  unknown = sorted(wanted - set(known))
  if unknown:
    raise ValueError(f'cells={config.cells!r}: unknown cells {unknown}; known: {known}')
  return wanted


def _cell_record(run: sweep.SweepRun, family: str) -> dict:
  with open(os.path.join(run.workdir, 'results.json')) as f:
    result = json.load(f)['variants'][family]
  model = run.config.model
  embedding = model.vocab_size * model.d_model * (1 if model.tie_embeddings else 2)
  active = result['params']['active'] - embedding
  tokens_per_step = run.config.train.batch_size * run.config.data.seq_len
  with open(os.path.join(run.workdir, family, 'metrics.jsonl')) as f:
    curve = [json.loads(line) for line in f if line.strip()]
  curve = [(r['step'], r['eval/loss']) for r in curve if 'eval/loss' in r]
  return {
    'family': family,
    'd_model': model.d_model,
    'num_layers': model.num_layers,
    'params_total': result['params']['total'],
    'active_non_embedding': active,
    'loss': result['eval']['loss'],
    'tokens': run.config.train.steps * tokens_per_step,
    'compute': FLOPS_PER_PARAM_TOKEN * active * run.config.train.steps * tokens_per_step,
    'curve': [(FLOPS_PER_PARAM_TOKEN * active * s * tokens_per_step, loss) for s, loss in curve],
  }


def fit_families(records: list[dict], families: list[str]) -> dict:
  out = {}
  for family in families:
    rows = [r for r in records if r['family'] == family]
    n = [r['active_non_embedding'] for r in rows]
    loss = [r['loss'] for r in rows]
    frontier = compute_frontier([p for r in rows for p in r['curve']])
    fit_n = fit_power_law(n, loss)
    fit_c = fit_power_law(*frontier)
    out[family] = {
      'L(N)': {**fit_n, 'ci95': bootstrap_ci(n, loss, fit_n)},
      'L(C)': {**fit_c, 'ci95': bootstrap_ci(*frontier, fit_c)},
      'frontier': list(zip(*frontier)),
    }
  return out


def equal_compute(fits: dict, records: list[dict]) -> dict:
  """Fitted L(C) of every family at the compute of each dense run (inside the fitted ranges)."""
  budgets = sorted(r['compute'] for r in records if r['family'] == 'dense')
  return {
    f'{c:.3g}': {family: float(predict(f['L(C)'], c)) for family, f in fits.items()}
    for c in budgets
  }


def plot(records, fits, workdir) -> list[str]:
  paths = []
  colors = dict(zip(fits, ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple')))
  for key, xlabel, name in (
    ('L(N)', 'activated non-embedding parameters N', 'loss_vs_params.png'),
    ('L(C)', 'training compute C = 6 N D (FLOPs)', 'loss_vs_compute.png'),
  ):
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for family, fit in fits.items():
      if key == 'L(N)':
        xs = [r['active_non_embedding'] for r in records if r['family'] == family]
        ys = [r['loss'] for r in records if r['family'] == family]
      else:
        xs, ys = zip(*fit['frontier'])
      grid = np.geomspace(min(xs), max(xs), 50)
      f = fit[key]
      ax.scatter(xs, ys, color=colors[family], s=14)
      ax.plot(
        grid,
        predict(f, grid),
        color=colors[family],
        label=f'{family}: {f["E"]:.2f} + {f["A"]:.3g}/x^{f["alpha"]:.2f}',
      )
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('validation loss')
    ax.legend(fontsize=7)
    paths.append(os.path.join(workdir, name))
    fig.savefig(paths[-1], dpi=100, bbox_inches='tight')
  return paths


def _ci(fit, key):
  lo, hi = fit['ci95'][key]
  return f'{fit[key]:.3g} [{lo:.3g}, {hi:.3g}]'


def table(records, fits, comparison, title) -> str:
  lines = [
    f'## {title}',
    '',
    '| family | d_model | layers | params | active non-emb. N | C (FLOPs) | loss |',
    '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for r in records:
    lines.append(
      f'| {r["family"]} | {r["d_model"]} | {r["num_layers"]} | {r["params_total"]:,} | '
      f'{r["active_non_embedding"]:,.0f} | {r["compute"]:.3g} | {r["loss"]:.4f} |'
    )
  lines += ['', '| family | fit | E | A | alpha (95% CI) | R^2 |', '|---|---|---|---|---|---:|']
  for family, fit in fits.items():
    for key in ('L(N)', 'L(C)'):
      f = fit[key]
      lines.append(
        f'| {family} | {key} | {_ci(f, "E")} | {_ci(f, "A")} | {_ci(f, "alpha")} | {f["r2"]:.3f} |'
      )
  families = list(fits)
  lines += [
    '',
    '| compute C | ' + ' | '.join(f'L_{f}(C)' for f in families) + ' |',
    '|---:|' + '---:|' * len(families),
  ]
  for c, row in comparison.items():
    lines.append(f'| {c} | ' + ' | '.join(f'{row[f]:.4f}' for f in families) + ' |')
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> dict:
  cells = cell_grid(config)
  runs = sweep.plan(
    config.base, [o for _, o in cells], os.path.join(workdir, 'runs'), names=[n for n, _ in cells]
  )
  wanted = selected_cells(config, [r.name for r in runs])
  # The base experiment's run() directly: importing kuaijax.main under `python -m kuaijax.main`
  # would define its flags twice.
  runner = importlib.import_module(f'experiments.{config.base.experiment}').run
  times = sweep.run_sweep([r for r in runs if r.name in wanted], runner)
  missing = [r.name for r in runs if not r.finished]
  if missing:
    print(f'fits wait for {len(missing)} unfinished cells: {missing}')
    return {'missing_cells': missing, 'train_seconds': times}
  records = [_cell_record(r, r.overrides['run_variants']) for r in runs]
  families = list(dict.fromkeys(r['family'] for r in records))
  fits = fit_families(records, families)
  comparison = equal_compute(fits, records) if 'dense' in fits else {}
  base = config.base
  title = (
    f'{base.data.name}: {len(records)} runs, {base.train.steps} steps x '
    f'{base.train.batch_size} x {base.data.seq_len} tokens each'
  )
  md = table(records, fits, comparison, title)
  plots = plot(records, fits, workdir) if jax.process_index() == 0 else []
  results = {
    'runs': records,
    'fits': {f: {k: v for k, v in fit.items() if k != 'frontier'} for f, fit in fits.items()},
    'frontier': {f: fit['frontier'] for f, fit in fits.items()},
    'equal_compute': comparison,
    'train_seconds': times,
    'plots': [os.path.basename(p) for p in plots],
  }
  write_results(workdir, results, md)
  print(md)
  return results
