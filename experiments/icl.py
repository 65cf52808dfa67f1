"""Many-shot ICL by gradient matching: the pipeline of `configs/icl/gradient_matching.py`, then the
table (method x shot count) and the plot.

Each training seed's value of a (method, k) cell is its test accuracy averaged over the sets (and,
for random, over the random draws); a cell is the mean ± std of that over the training seeds of
the target. A second table gives each set's accuracy (mean over seeds), a third the gradient-matching
objective per k and how many selections lost demonstrations to the target's context.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from kuaijax import plotting
from kuaijax.results import write_results
from kuaijax.stages import report, run_pipeline
from kuaijax.stages.base import data_of
from kuaijax.stages.icl import METHODS, accuracy_by_method

LABELS = {
  'random': 'random',
  'best_of_n': 'best-of-n random (dev)',
  'bm25': 'BM25 (dev queries)',
  'kmeans': 'k-means (proxy embeddings)',
  'gradient_matching': 'gradient matching',
}


def summarise(per_seed_records: dict) -> dict:
  """{method: {k: [mean, std] over seeds}} and per set {set: {method: {k: mean over seeds}}}."""
  cells = {seed: accuracy_by_method(recs) for seed, recs in per_seed_records.items()}
  methods = [m for m in METHODS if all(m in c for c in cells.values())]
  table = {}
  for m in methods:
    ks = sorted(set.intersection(*(set(c[m]) for c in cells.values())))
    table[m] = {k: report.mean_std([c[m][k] for c in cells.values()]) for k in ks}
  per_set: dict = {}
  for recs in per_seed_records.values():
    for r in recs:
      per_set.setdefault(r['set'], {}).setdefault(r['method'], {}).setdefault(r['k'], []).append(
        r['accuracy']
      )
  per_set = {
    s: {m: {k: float(np.mean(v)) for k, v in ks.items()} for m, ks in ms.items()}
    for s, ms in per_set.items()
  }
  return {'table': table, 'per_set': per_set}


def results_table(summary: dict, runs: dict, seeds: int) -> str:
  table = summary['table']
  ks = sorted({k for row in table.values() for k in row})
  spread = report.spread_note(runs)
  lines = [
    f'## Test accuracy (%) by shot count k, averaged over the sets; {spread} of the target',
    '',
    '| method | ' + ' | '.join(f'k={k}' for k in ks) + ' |',
    '|---|' + '---:|' * len(ks),
  ]
  for method, row in table.items():
    cells = [
      (f'{100 * row[k][0]:.1f}' + (f' ± {100 * row[k][1]:.1f}' if seeds > 1 else ''))
      if k in row
      else '-'
      for k in ks
    ]
    lines.append(f'| {LABELS[method]} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Per set (%), mean over training seeds', '']
  lines += ['| set | method | ' + ' | '.join(f'k={k}' for k in ks) + ' |']
  lines += ['|---|---|' + '---:|' * len(ks)]
  for name, methods in summary['per_set'].items():
    for method in (m for m in METHODS if m in methods):
      cells = [f'{100 * methods[method][k]:.1f}' if k in methods[method] else '-' for k in ks]
      lines.append(f'| {name} | {LABELS[method]} | ' + ' | '.join(cells) + ' |')
  first = runs[next(iter(runs))]
  objective = first['select']['summary'].get('gradient_matching_objective', {})
  if objective:
    lines += [
      '',
      'Gradient-matching objective |mean selected - mean pool gradient| / |mean pool gradient| '
      '(proxy features):',
      '',
      '| set | ' + ' | '.join(f'k={k}' for k in ks) + ' |',
      '|---|' + '---:|' * len(ks),
    ]
    for name, row in objective.items():
      lines.append(
        f'| {name} | ' + ' | '.join(f'{row.get(str(k), float("nan")):.3f}' for k in ks) + ' |'
      )
  truncated = first['icl_eval']['summary']['truncated_selections']
  lines += ['', f'Selections with demonstrations dropped to fit the context: {truncated}.']
  return '\n'.join(lines) + '\n'


def plot_accuracy_vs_k(summary: dict, path: str) -> str:
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for method, row in summary['table'].items():
    ks = sorted(row)
    mean = np.array([row[k][0] for k in ks]) * 100
    std = np.array([row[k][1] for k in ks]) * 100
    ax.errorbar(ks, mean, yerr=std, marker='o', capsize=3, label=LABELS[method])
  ax.set(xscale='log', xlabel='demonstrations k', ylabel='test accuracy (%)')
  ks = sorted({k for r in summary['table'].values() for k in r})
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  runs = run_pipeline(config, workdir)
  per_seed = {seed: data_of(stages['icl_eval']) for seed, stages in runs.items()}
  summary = summarise(per_seed)
  results = {
    'table': {m: {str(k): v for k, v in row.items()} for m, row in summary['table'].items()},
    'per_set': summary['per_set'],
    'runs': report.without_blocks(runs),
    'seeds': report.seeds_record(config),
    'wall_s': time.time() - start,
  }
  table = results_table(summary, runs, len(runs))
  if jax.process_index() == 0:
    plots = plotting.write_loss_curves(workdir, report.trained_stage_dirs(runs, workdir))
    plots.append(plot_accuracy_vs_k(summary, os.path.join(workdir, 'accuracy_vs_k.png')))
    results['plots'] = [os.path.basename(p) for p in plots]
  write_results(workdir, json.loads(json.dumps(results, default=float)), table)
  print(table)
  return results
