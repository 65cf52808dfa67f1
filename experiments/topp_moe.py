"""Dense vs Top-1 / Top-2 / dynamic Top-P MoE decoders trained on the same tokens (arXiv 2403.07652).

The training is the pipeline of configs/topp_moe/compare.py (`kuaijax.stages.run_pipeline`): one
'pretrain' stage per variant, `config.models.<variant>` trained into
`<workdir>/seed_<s>/<variant>/` (each resumes on its own), with the same init seed, data order,
steps, batch and optimizer for every variant of a training seed, the MoE auxiliary losses of the
stage's `aux_loss` (paper: balance 1e-2, entropy 1e-4, averaged over layers), and scored on the same
evaluation batches: validation loss per task, experts per token per task and per layer
(`kuaijax.evals.moe_stats`), activated parameters, and the paper's "harder -> more experts" at token
level: per MoE layer and task, the Spearman rank correlation between a target token's loss under the
model and the number of experts it selected (the `moe_token_loss` evaluator).

This file reads each stage's stage.json and metrics.jsonl and writes results.json, results.md (the
tables; mean ± std over training seeds when there are several), loss_curves.png,
mean_k_per_layer.png, mean_k_over_steps.png and loss_k_spearman.png.
"""

from __future__ import annotations

import os

import jax
from matplotlib.figure import Figure

from kuaijax import plotting
from kuaijax.evals.moe_stats import layer_values
from kuaijax.results import write_results
from kuaijax.stages import report, run_pipeline
from kuaijax.train.metrics import read_metrics

REFERENCE_VARIANT = 'top2'  # activated parameters are reported relative to this one when present


def _fmt(value, spec='.3f'):
  return '–' if value is None else format(value, spec)


def _pm(value, std, spec):
  """'value ± std' (the std over training seeds, when there is one), or '–'."""
  if value is None:
    return '–'
  return format(value, spec) + ('' if std is None else f' ± {std:{spec}}')


def results_tables(rows: dict, task_names, title: str) -> str:
  """Markdown: one row per variant (loss and experts per token per task), then mean k per layer
  and, when evaluated, multiple-choice accuracy per task (the paper's table)."""
  lines = [
    f'## {title}',
    '',
    '| variant | params | active params | active / Top-2 | loss (all) | '
    + ' | '.join(f'loss {t}' for t in task_names)
    + ' | experts/token | '
    + ' | '.join(f'k {t}' for t in task_names)
    + ' |',
    '|---|' + '---:|' * (4 + len(task_names) + 1 + len(task_names)),
  ]
  for name, row in rows.items():
    ev, std, counts = row['eval'], row['eval_std'], row['params']
    active = counts['active']
    cells = [
      name,
      f'{counts["total"] / 1e6:.2f}M',
      _fmt(None if active is None else active / 1e6, '.2f') + ('M' if active is not None else ''),
      _fmt(row.get('active_vs_top2'), '.2f'),
      report.cell(ev, std, 'loss'),
      *(report.cell(ev, std, f'loss/{t}') for t in task_names),
      report.cell(ev, std, 'experts_per_token', '.2f'),
      *(report.cell(ev, std, f'experts_per_token/{t}', '.2f') for t in task_names),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  moe_rows = {n: r for n, r in rows.items() if r['layer_mean_k']}
  if moe_rows:
    layers = sorted({layer for r in moe_rows.values() for layer in r['layer_mean_k']})
    lines += [
      '',
      'Experts per token per MoE layer, mean / max (validation target tokens):',
      '',
      '| variant | ' + ' | '.join(f'layer {i}' for i in layers) + ' | train trunc rate |',
      '|---|' + '---:|' * (len(layers) + 1),
    ]
    for name, row in moe_rows.items():
      mean_k, mean_k_std = row['layer_mean_k'], row['layer_mean_k_std']
      cells = [
        f'{_pm(mean_k.get(i), mean_k_std.get(i), ".2f")} / {_fmt(row["layer_max_k"].get(i), ".0f")}'
        for i in layers
      ]
      lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {_fmt(row["trunc_rate"], ".3f")} |')
    curves = {n: r['mean_k_curve'] for n, r in moe_rows.items() if r['mean_k_curve']}
    if curves:
      lines += [
        '',
        'Mean experts per token during training (all MoE layers, training batches):',
        '',
        '| variant | first logged step | last step |',
        '|---|---:|---:|',
      ]
      for name, curve in curves.items():
        (s0, k0, d0), (s1, k1, d1) = curve[0], curve[-1]
        lines.append(
          f'| {name} | {_pm(k0, d0, ".2f")} (step {s0}) | {_pm(k1, d1, ".2f")} (step {s1}) |'
        )
    lines += [
      '',
      "Spearman rank correlation between a target token's loss and its number of experts, per "
      'layer (– : undefined, the number of experts is constant):',
      '',
      '| variant | tokens | ' + ' | '.join(f'layer {i}' for i in layers) + ' |',
      '|---|---|' + '---:|' * len(layers),
    ]
    for name, row in moe_rows.items():
      for task, rhos in row['layer_spearman'].items():
        if not rhos:  # undefined in every layer: k is constant
          continue
        spread = row['layer_spearman_std'][task]
        cells = [_pm(rhos.get(i), spread.get(i), '.3f') for i in layers]
        lines.append(f'| {name} | {task} | ' + ' | '.join(cells) + ' |')
  mc_tasks = sorted(
    {k.removeprefix('acc/') for r in rows.values() for k in r['eval'] if k.startswith('acc/')}
  )
  if mc_tasks:
    lines += [
      '',
      'Zero-shot multiple-choice accuracy (%):',
      '',
      '| variant | ' + ' | '.join(mc_tasks) + ' | average |',
      '|---|' + '---:|' * (len(mc_tasks) + 1),
    ]
    for name, row in rows.items():
      pct = lambda d: {k: 100 * v for k, v in d.items() if k == 'acc' or k.startswith('acc/')}
      ev, std = pct(row['eval']), pct(row['eval_std'])
      keys = [f'acc/{t}' for t in mc_tasks] + ['acc']
      lines.append(f'| {name} | ' + ' | '.join(report.cell(ev, std, k, '.1f') for k in keys) + ' |')
  return '\n'.join(lines) + '\n'


def _save(ax, path: str, **title_and_labels) -> str:
  fig = ax.figure
  ax.set(**title_and_labels)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return path


def plot_mean_k(rows: dict, workdir: str) -> list[str]:
  """mean_k_per_layer.png (validation), mean_k_over_steps.png (training logs) and
  loss_k_spearman.png (token loss vs experts selected, per layer and task).

  Uses matplotlib's Figure directly (no pyplot), so no GUI backend is needed or changed.
  """
  moe_rows = {n: r for n, r in rows.items() if r['layer_mean_k']}
  if not moe_rows:
    return []
  axes = {name: Figure(figsize=(6, 4)).subplots() for name in ('layer', 'steps', 'rho')}
  for name, row in moe_rows.items():
    layers = sorted(row['layer_mean_k'])
    axes['layer'].plot(layers, [row['layer_mean_k'][i] for i in layers], marker='o', label=name)
    axes['layer'].set_xticks(layers)
    steps, values, spread = zip(*row['mean_k_curve']) if row['mean_k_curve'] else ((), (), ())
    axes['steps'].plot(steps, values, marker='.', label=name)
    if spread and spread[0] is not None:
      low = [v - d for v, d in zip(values, spread)]
      high = [v + d for v, d in zip(values, spread)]
      axes['steps'].fill_between(steps, low, high, alpha=0.2)
    for task, rhos in row['layer_spearman'].items():
      if rhos:
        layers = sorted(rhos)
        style = dict(linewidth=2.5, color='k') if task == 'all' else {}
        values = [rhos[i] for i in layers]
        axes['rho'].plot(layers, values, marker='o', label=f'{name} {task}', **style)
  axes['rho'].axhline(0.0, color='grey', linewidth=0.8)
  path = lambda name: os.path.join(workdir, name)
  return [
    _save(
      axes['layer'],
      path('mean_k_per_layer.png'),
      title='experts per token by layer (validation)',
      xlabel='layer',
      ylabel='mean k',
    ),
    _save(
      axes['steps'],
      path('mean_k_over_steps.png'),
      title='experts per token during training',
      xlabel='step',
      ylabel='mean k (all layers)',
    ),
    _save(
      axes['rho'],
      path('loss_k_spearman.png'),
      title='token loss vs experts selected (Spearman)',
      xlabel='layer',
      ylabel='rank correlation',
    ),
  ]


def variant_row(config, runs: dict, name: str) -> dict:
  """One variant's row: its evaluation over training seeds (mean, std), experts per layer, the
  Spearman correlations (mean and std per layer and task), its mean-k training curve (mean and std
  over seeds) and parameter counts."""
  infos = [stages[name] for stages in runs.values()]
  ev, std = report.eval_over_seeds([info['eval'] for info in infos])
  last = [r for r in read_metrics(infos[0]['dir']) if 'aux/mean_k' in r][-1:]
  actives = [info['summary']['params']['active'] for info in infos]
  spearman_key = lambda task: 'loss_k_spearman' + ('' if task == 'all' else f'/{task}')
  tasks = ('all', *config.data.task_names)
  return {
    'eval': ev,
    'eval_std': std,
    'layer_mean_k': layer_values(ev, 'mean_k'),
    'layer_mean_k_std': layer_values(std, 'mean_k'),
    'layer_max_k': layer_values(ev, 'max_k'),
    'layer_spearman': {task: layer_values(ev, spearman_key(task)) for task in tasks},
    'layer_spearman_std': {task: layer_values(std, spearman_key(task)) for task in tasks},
    'mean_k_curve': report.logged_over_seeds(infos, 'aux/mean_k'),
    'trunc_rate': last[0].get('aux/trunc_rate') if last else None,
    'params': {
      'total': infos[0]['summary']['params']['total'],
      'active': None if None in actives else report.mean_std(actives)[0],
    },
    'step': infos[0]['summary']['steps'],
  }


def run(config, workdir: str) -> dict:
  runs = run_pipeline(config, workdir)
  first = runs[config.seeds[0]]
  names = [n for n, info in first.items() if info['type'] == 'pretrain']
  rows = {name: variant_row(config, runs, name) for name in names}
  ref = rows.get(REFERENCE_VARIANT)
  if ref and ref['params']['active']:
    for row in rows.values():
      active = row['params']['active']
      row['active_vs_top2'] = None if active is None else active / ref['params']['active']
  train = config.train
  tokens = train.steps * train.batch_size * config.data.seq_len
  table = results_tables(
    rows,
    config.data.task_names,
    f'{config.data.name}: {len(rows)} variants, {train.steps} steps x {train.batch_size} x '
    f'{config.data.seq_len} = {tokens:,} training tokens each; {report.spread_note(runs)}',
  )
  differences = []
  if REFERENCE_VARIANT in names:
    differences = report.paired_differences(runs, names, REFERENCE_VARIANT)
    table += '\n' + report.differences_table(differences, REFERENCE_VARIANT)
  plots = plot_mean_k(rows, workdir) if jax.process_index() == 0 else []
  plots += plotting.write_loss_curves(
    workdir, report.trained_stage_dirs(runs, workdir, ('pretrain',))
  )
  results = {
    'variants': rows,
    'differences_to_top2': differences,
    'seeds': report.seeds_record(config),
    'tokens_per_variant': tokens,
    'task_names': list(config.data.task_names),
    'runs': report.without_blocks(runs),
    'plots': [os.path.basename(p) for p in plots],
  }
  write_results(workdir, results, table)
  print(table)
  return results
