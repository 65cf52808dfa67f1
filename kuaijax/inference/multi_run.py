"""Repeating a sampling evaluation over several seeds, and what the spread says about the problems.

A single sampled evaluation is one draw; `multi_run(evaluate_fn, seeds)` runs it once per seed and
reports every metric's mean and sample std (ddof 1) over the runs, plus per-problem stability:
a problem is "uncertain" when some runs solve it and others do not; the accuracy on the certain
problems (solved in all runs or in none) is the part of the score that no seed changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


def run_statistics(per_run: Sequence[Mapping[str, float]], correct) -> dict:
  """Mean / std / min / max per metric over runs, and the uncertain-problem statistics.

  Args:
    per_run: one {metric: float} per run (the same keys in every run).
    correct: [runs, problems] bool, whether run r solved problem i.
  """
  correct = np.asarray(correct, bool)
  if correct.ndim != 2 or correct.shape[0] != len(per_run) or not len(per_run):
    raise ValueError(
      f'correct must be [runs, problems] with runs = {len(per_run)} >= 1, got {correct.shape}'
    )
  keys = list(per_run[0])
  if any(list(r) != keys for r in per_run):
    raise ValueError('every run must report the same metrics')
  out = {}
  for key in keys:
    values = np.asarray([r[key] for r in per_run], np.float64)
    out[key] = float(values.mean())
    out[f'{key}/std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out[f'{key}/min'], out[f'{key}/max'] = float(values.min()), float(values.max())
  always, ever = correct.all(axis=0), correct.any(axis=0)
  uncertain = ever & ~always
  out['uncertain_fraction'] = float(uncertain.mean()) if correct.shape[1] else float('nan')
  certain = ~uncertain
  out['certain_count'] = int(certain.sum())
  out['accuracy_on_certain'] = float(always[certain].mean()) if certain.any() else float('nan')
  out['num_runs'] = len(per_run)
  return out


def multi_run(evaluate_fn: Callable[[int], tuple[dict, np.ndarray]], seeds: Sequence[int]) -> dict:
  """Runs `evaluate_fn(seed) -> (metrics, correct [problems] bool)` per seed; `run_statistics`.

  The result also holds the per-run metrics under 'per_run'.
  """
  seeds = list(seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds must be a non-empty list of distinct seeds, got {seeds}')
  runs = [evaluate_fn(seed) for seed in seeds]
  per_run = [dict(metrics) for metrics, _ in runs]
  correct = np.stack([np.asarray(c, bool) for _, c in runs])
  return {**run_statistics(per_run, correct), 'per_run': per_run}
