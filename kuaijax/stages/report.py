"""What every experiment's report needs from a pipeline's runs: values over training seeds, the
seeds record of results.json, and the stage folders to plot.

`runs` is what `kuaijax.stages.runner.run_pipeline` returns: {seed: {stage name: stage info}}.
"""

from __future__ import annotations

import os

import numpy as np

from kuaijax.train.metrics import read_metrics


def seeds_record(config) -> dict[str, list[int]]:
  """results.json's `"seeds"`: the training seeds of the pipeline and the sampling seeds of its
  evaluators (empty when no evaluator samples)."""
  sampling = sorted(
    {int(s) for ev in config.get('evals', {}).values() for s in ev.get('seeds', ())}
  )
  return {'training': [int(s) for s in config.seeds], 'sampling': sampling}


def mean_std(values) -> list[float]:
  """[mean, sample std (ddof 1; 0 for one value)] of `values`."""
  v = np.asarray(values, np.float64)
  return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


def spread_note(runs: dict) -> str:
  """What a table's ± is over, in words."""
  n = len(runs)
  return f'mean ± std over {n} training seeds' if n > 1 else '1 training seed'


def trained_stage_dirs(runs: dict, workdir: str, types=('train',)) -> list[str]:
  """The folders (relative to `workdir`) of the first seed's stages of `types`, for loss curves."""
  first = runs[next(iter(runs))]
  return [os.path.relpath(info['dir'], workdir) for info in first.values() if info['type'] in types]


def without_blocks(runs: dict) -> dict:
  """`runs` for results.json: every stage's info without its config block and folder."""
  return {
    str(seed): {
      name: {k: v for k, v in info.items() if k not in ('block', 'dir')}
      for name, info in stages.items()
    }
    for seed, stages in runs.items()
  }


def logged_over_seeds(infos: list[dict], key: str) -> list[tuple[int, float, float | None]]:
  """(step, mean, std) over training seeds of the metrics.jsonl value `key` of each stage in
  `infos` (one per seed), at every step all of them logged; std None for one seed."""
  per_seed = [{r['step']: r[key] for r in read_metrics(i['dir']) if key in r} for i in infos]
  steps = sorted(set.intersection(*(set(c) for c in per_seed)))
  out = []
  for step in steps:
    mean, std = mean_std([c[step] for c in per_seed])
    out.append((step, mean, std if len(per_seed) > 1 else None))
  return out


def eval_over_seeds(evals: list[dict]) -> tuple[dict, dict]:
  """(mean, std) per number reported by every one of `evals` (one evaluation dict per training
  seed); a value equal in every seed (one seed, a token count) is kept as it is. `std` is empty for
  one seed; lists are left out."""
  if not evals:
    return {}, {}
  mean, std = {}, {}
  for key, first in evals[0].items():
    values = [e.get(key) for e in evals]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
      continue
    if all(v == first for v in values):
      mean[key] = first
    else:
      mean[key], _ = mean_std(values)
    if len(evals) > 1:
      std[key] = mean_std(values)[1]
  return mean, std


def cell(mean: dict, std: dict, key: str, spec: str = '.4f', missing: str = '–') -> str:
  """One table cell: `mean[key]`, with ' ± std' when `std` (several training seeds) has it."""
  if mean.get(key) is None:
    return missing
  if key in std:
    return f'{mean[key]:{spec}} ± {std[key]:{spec}}'
  return format(mean[key], spec)


def paired_differences(runs: dict, names, baseline: str, key: str = 'loss') -> list[dict]:
  """Per variant of `names` but the baseline: its final `eval[key]` minus the baseline's trained on
  the same seed (same data order and initialisation seed), mean ± std over training seeds, and on
  how many seeds it is lower."""
  seeds = [s for s in runs if baseline in runs[s]]
  rows = []
  for name in names:
    if name == baseline:
      continue
    diffs = [runs[s][name]['eval'][key] - runs[s][baseline]['eval'][key] for s in seeds]
    mean, std = mean_std(diffs)
    rows.append(
      dict(variant=name, mean=mean, std=std, lower=sum(d < 0 for d in diffs), seeds=len(diffs))
    )
  return rows


def differences_table(rows: list[dict], baseline: str, key: str = 'loss') -> str:
  """Markdown: the paired differences of `paired_differences` to the baseline."""
  seeds = max((r['seeds'] for r in rows), default=1)
  over = 'mean ± std over seeds' if seeds > 1 else '1 training seed'
  lines = [
    f'## Validation {key} minus {baseline} on the same training seed ({over})',
    '',
    f'| variant | {key} - {baseline} | lower than {baseline} on |',
    '|---|---:|---:|',
  ]
  for r in rows:
    spread = f' ± {r["std"]:.4f}' if r['seeds'] > 1 else ''
    lines.append(
      f'| {r["variant"]} | {r["mean"]:+.4f}{spread} | {r["lower"]} of {r["seeds"]} seeds |'
    )
  return '\n'.join(lines) + '\n'


def accuracy_cell(evals: list[dict], key: str, *, sampled: bool = True) -> str:
  """Accuracy (%) of one policy: mean ± std over training seeds when there are several; with one
  seed, a sampled accuracy's mean ± std over its sampling seeds, or the greedy accuracy alone."""
  if not evals or any(key not in e for e in evals):
    return '-'
  if len(evals) > 1:
    mean, std = mean_std([e[key] for e in evals])
  elif sampled:
    mean, std = evals[0][key], evals[0][key + '/std']
  else:
    return f'{100 * evals[0][key]:.1f}'
  return f'{100 * mean:.1f} ± {100 * std:.1f}'
