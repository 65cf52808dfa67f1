"""Scaling laws of dense, Top-2 and Top-P MoE decoders trained on the same tokens.

The training is the pipeline of configs/scaling/dense_vs_moe.py (`kuaijax.stages.run_pipeline`):
every cell (family x size) of the grid is a model role and a 'pretrain' stage, trained per training
seed into `<workdir>/seed_<s>/<cell>/`; finished cells are skipped, so the experiment resumes, and
the config's `cells=` limits a call to some cells (e.g. one cluster job per cell, same workdir).
Once every cell has finished (for every training seed), the experiment fits per family
(`kuaijax.scaling_laws`, on the losses averaged over training seeds)

  L(N) = E + A / N^alpha     (N: activated non-embedding parameters per token, final eval loss)
  L(C) = E + A / C^alpha     (C = 6 N D training FLOPs, on the family's compute frontier: the lowest
                              eval loss reached with at most C, over all sizes and eval steps)

with 95% residual-bootstrap confidence intervals, compares the families at equal compute, and writes
results.json, results.md and loss_vs_params.png and loss_vs_compute.png. For Top-P, N counts the
experts' weights times the measured mean experts per token of each layer (final evaluation).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from matplotlib.figure import Figure

from kuaijax.results import write_results
from kuaijax.scaling_laws import (
  FLOPS_PER_PARAM_TOKEN,
  dense_budgets,
  difference_at_compute,
  equal_compute,
  fit_families,
  predict,
)
from kuaijax.stages import report, roles, run_pipeline
from kuaijax.stages.base import STAGE_FILE
from kuaijax.stages.runner import seed_dir


def grid(config) -> list[str]:
  """Every cell of the grid (the config's pretrain stages), in order."""
  return [name for name, block in config.stage.items() if block.type == 'pretrain']


def finished_cells(config, workdir: str) -> tuple[dict, list[str]]:
  """({cell: [its stage.json content plus 'dir', one per training seed]}, cells not finished)."""
  done, missing = {}, []
  for cell in grid(config):
    infos = []
    for seed in config.seeds:
      folder = os.path.join(seed_dir(workdir, seed), cell)
      if os.path.exists(os.path.join(folder, STAGE_FILE)):
        with open(os.path.join(folder, STAGE_FILE)) as f:
          infos.append({**json.load(f), 'dir': folder})
    if len(infos) == len(config.seeds):
      done[cell] = infos
    else:
      missing.append(cell)
  return done, missing


def cell_record(config, cell: str, infos: list[dict]) -> dict:
  """One cell's row: sizes, activated non-embedding parameters, loss (over seeds), compute and
  eval curve."""
  block = config.stage[cell]
  model = roles.model_section(config, cell)
  embedding = model.vocab_size * model.d_model * (1 if model.tie_embeddings else 2)
  active = report.mean_std([i['summary']['params']['active'] for i in infos])[0] - embedding
  train = {**config.train.to_dict(), **block.train.to_dict()}
  tokens_per_step = train['batch_size'] * config.data.seq_len
  loss, loss_std = report.mean_std([i['eval']['loss'] for i in infos])
  flops = lambda steps: FLOPS_PER_PARAM_TOKEN * active * steps * tokens_per_step
  record = {
    'family': block.family,
    'd_model': model.d_model,
    'num_layers': model.num_layers,
    'params_total': infos[0]['summary']['params']['total'],
    'active_non_embedding': active,
    'loss': loss,
    'tokens': train['steps'] * tokens_per_step,
    'compute': flops(train['steps']),
    'curve': [(flops(s), loss) for s, loss, _ in report.logged_over_seeds(infos, 'eval/loss')],
  }
  if len(infos) > 1:
    record['loss_std'] = loss_std
  return record


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


def per_seed_differences(config, done: dict, budgets, baseline: str = 'dense') -> dict:
  """{budget: {family: {'mean', 'std', 'lower', 'seeds'}}}: L(C) fitted on each training seed's
  runs alone, the family's minus the baseline's at each budget, over seeds; empty for one seed."""
  if len(config.seeds) < 2:
    return {}
  per_seed = []
  for i in range(len(config.seeds)):
    records = [cell_record(config, cell, [infos[i]]) for cell, infos in done.items()]
    families = list(dict.fromkeys(r['family'] for r in records))
    fits = fit_families(records, families, intervals=False)
    per_seed.append(
      {
        f'{c:.3g}': {
          f: float(predict(fits[f]['L(C)'], c) - predict(fits[baseline]['L(C)'], c))
          for f in families
          if f != baseline
        }
        for c in budgets
      }
    )
  out = {}
  for budget, row in per_seed[0].items():
    out[budget] = {}
    for family in row:
      diffs = [seed_row[budget][family] for seed_row in per_seed]
      mean, std = report.mean_std(diffs)
      out[budget][family] = dict(
        mean=mean, std=std, lower=sum(d < 0 for d in diffs), seeds=len(diffs)
      )
  return out


def table(records, fits, comparison, title, differences=None, seed_differences=None) -> str:
  lines = [
    f'## {title}',
    '',
    '| family | d_model | layers | params | active non-emb. N | tokens / N | C (FLOPs) | loss |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in records:
    lines.append(
      f'| {r["family"]} | {r["d_model"]} | {r["num_layers"]} | {r["params_total"]:,} | '
      f'{r["active_non_embedding"]:,.0f} | {r["tokens"] / r["active_non_embedding"]:.1f} | '
      f'{r["compute"]:.3g} | '
      f'{report.cell(r, {"loss": r["loss_std"]} if "loss_std" in r else {}, "loss")} |'
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
  others = [f for f in families if f != 'dense']
  if differences and others:
    lines += [
      '',
      'Equal compute, MoE minus dense: the fits above (95% interval from independent residual '
      'bootstraps of both frontiers)'
      + (
        '; and L(C) fitted on each training seed alone (mean ± std over seeds, seeds where the MoE '
        'is lower)'
        if seed_differences
        else ''
      )
      + ':',
      '',
      '| compute C | '
      + ' | '.join(
        f'{f} - dense (fit)' + (f' | {f} - dense (per seed)' if seed_differences else '')
        for f in others
      )
      + ' |',
      '|---:|' + '---:|' * (len(others) * (2 if seed_differences else 1)),
    ]
    for c, row in differences.items():
      cells = []
      for f in others:
        point, low, high = row[f]
        cells.append(f'{point:+.4f} [{low:+.4f}, {high:+.4f}]')
        if seed_differences:
          d = seed_differences[c][f]
          cells.append(f'{d["mean"]:+.4f} ± {d["std"]:.4f} ({d["lower"]} of {d["seeds"]})')
      lines.append(f'| {c} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> dict:
  runs = run_pipeline(config, workdir)
  done, missing = finished_cells(config, workdir)
  times = {cell: sum(i['wall_s'] for i in infos) for cell, infos in done.items()}
  if missing:
    print(f'fits wait for {len(missing)} unfinished cells: {missing}')
    return {'missing_cells': missing, 'train_seconds': times}
  records = [cell_record(config, cell, infos) for cell, infos in done.items()]
  families = list(dict.fromkeys(r['family'] for r in records))
  fits = fit_families(records, families)
  budgets = dense_budgets(records)
  comparison = equal_compute(fits, budgets) if 'dense' in fits else {}
  differences = difference_at_compute(fits, budgets) if 'dense' in fits else {}
  seed_differences = per_seed_differences(config, done, budgets) if 'dense' in fits else {}
  train, seq_len = config.train, config.data.seq_len
  title = (
    f'{config.data.name}: {len(records)} runs, {train.steps} steps x {train.batch_size} x '
    f'{seq_len} tokens each; {report.spread_note(runs)}'
  )
  md = table(records, fits, comparison, title, differences, seed_differences)
  plots = plot(records, fits, workdir) if jax.process_index() == 0 else []
  results = {
    'runs': records,
    'fits': {f: {k: v for k, v in fit.items() if k != 'frontier'} for f, fit in fits.items()},
    'frontier': {f: fit['frontier'] for f, fit in fits.items()},
    'equal_compute': comparison,
    'minus_dense_at_compute': differences,
    'minus_dense_per_seed': seed_differences,
    'seeds': report.seeds_record(config),
    'train_seconds': times,
    'plots': [os.path.basename(p) for p in plots],
  }
  write_results(workdir, results, md)
  print(md)
  return results
