"""Scaling-law fits: L = E + A x^-alpha by least squares with a profiled exponent,
residual-bootstrap confidence intervals, the compute frontier of a family of runs, and families compared at equal
compute (`experiments/scaling.py` reads its runs into records and calls these).

A record is one trained model: {'family', 'active_non_embedding' (N), 'loss' (final evaluation),
'compute' (C = 6 N D FLOPs), 'curve' ([(compute so far, eval loss)] over its evaluations)}.
"""

from __future__ import annotations

import math

import numpy as np

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


def bootstrap_fits(x, y, fit: dict, *, samples: int = 300, seed: int = 0) -> list[dict]:
  """Refits to the fit's predictions plus residuals resampled with replacement (residual
  bootstrap)."""
  rng = np.random.default_rng(seed)
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mean = predict(fit, x)
  residuals = y - mean
  return [fit_power_law(x, mean + rng.choice(residuals, len(x))) for _ in range(samples)]


def bootstrap_ci(x, y, fit: dict, *, samples: int = 300, seed: int = 0) -> dict:
  """95% intervals of E, A, alpha from `bootstrap_fits`."""
  draws = bootstrap_fits(x, y, fit, samples=samples, seed=seed)
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


def fit_families(records: list[dict], families: list[str], *, intervals: bool = True) -> dict:
  """{family: {'L(N)', 'L(C)' (each with 'ci95' when `intervals`), 'frontier'}}."""
  out = {}
  for family in families:
    rows = [r for r in records if r['family'] == family]
    n = [r['active_non_embedding'] for r in rows]
    loss = [r['loss'] for r in rows]
    frontier = compute_frontier([p for r in rows for p in r['curve']])
    fit_n = fit_power_law(n, loss)
    fit_c = fit_power_law(*frontier)
    if intervals:
      fit_n['ci95'] = bootstrap_ci(n, loss, fit_n)
      fit_c['ci95'] = bootstrap_ci(*frontier, fit_c)
    out[family] = {'L(N)': fit_n, 'L(C)': fit_c, 'frontier': list(zip(*frontier))}
  return out


def dense_budgets(records: list[dict]) -> list[float]:
  """The training compute of every dense run: where the families are compared."""
  return sorted(r['compute'] for r in records if r['family'] == 'dense')


def equal_compute(fits: dict, budgets) -> dict:
  """Fitted L(C) of every family at each compute budget."""
  return {
    f'{c:.3g}': {family: float(predict(f['L(C)'], c)) for family, f in fits.items()}
    for c in budgets
  }


def difference_at_compute(fits: dict, budgets, *, baseline: str = 'dense', seed: int = 0) -> dict:
  """{budget: {family: [L_family(C) - L_baseline(C), 95% low, 95% high]}} from the fitted L(C) laws;
  the interval refits both families' frontiers by residual bootstrap (independent draws) and takes
  percentiles of the difference."""
  draws = {
    family: bootstrap_fits(*zip(*f['frontier']), f['L(C)'], seed=seed + i)
    for i, (family, f) in enumerate(fits.items())
  }
  out = {}
  for c in budgets:
    base = np.array([predict(d, c) for d in draws[baseline]])
    row = {}
    for family, fit in fits.items():
      if family == baseline:
        continue
      diffs = np.array([predict(d, c) for d in draws[family]]) - base
      point = float(predict(fit['L(C)'], c) - predict(fits[baseline]['L(C)'], c))
      row[family] = [point, float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]
    out[f'{c:.3g}'] = row
  return out
