"""Dense vs Top-1 / Top-2 / dynamic Top-P MoE decoders trained on the same tokens (arXiv 2403.07652).

Every variant in `config.run_variants` is the base `config.model` updated by
`config.variants[name]` (MoE variants: `mlp='moe'` and `mlp_options` on top of `config.moe_layer`),
trained with the same data order, steps, batch and optimizer into `workdir/<name>/` (each resumes
on its own), and scored on the same evaluation batches: validation loss per task, experts per
token per task and per layer (`kuaijax.evals.moe_stats`), activated parameters, and the paper's
"harder -> more experts" at token level: per MoE layer and task, the Spearman rank correlation
between a target token's loss under the model and the number of experts it selected
(the `moe_token_loss` evaluator). The MoE auxiliary losses enter with the weights of `config.moe_loss` (paper:
balance 1e-2, entropy 1e-4), averaged or summed over layers.

Writes results.json, results.md (the tables), loss_curves.png, mean_k_per_layer.png,
mean_k_over_steps.png and loss_k_spearman.png.
"""

from __future__ import annotations

import os

import jax
from matplotlib.figure import Figure

from kuaijax import plotting
from kuaijax.config_lib import check_choice
from kuaijax.results import write_results
from kuaijax.train import lm_task
from kuaijax.train.metrics import read_metrics
from kuaijax.train.trainer import train

EXPERT_WEIGHTS = ('w1', 'w2', 'w3')
REFERENCE_VARIANT = 'top2'  # activated parameters are reported relative to this one when present


def variant_names(config) -> list[str]:
  names = [n.strip() for n in config.run_variants.split(',') if n.strip()]
  if not names:
    raise ValueError('run_variants is empty')
  for name in names:
    check_choice('run_variants', name, set(config.variants))
  return names


def variant_config(config, name: str):
  """`config` with `model` replaced by the variant's model section (MoE options merged)."""
  overrides = config.variants[name].to_dict()
  sub = config.copy_and_resolve_references()
  model = sub.model.to_dict()
  layer_options = overrides.pop('mlp_options', {})
  model.update(overrides)
  if model['mlp'] == 'moe':
    model['mlp_options'] = {**config.moe_layer.to_dict(), **layer_options}
  elif layer_options:
    raise ValueError(f'variants.{name}.mlp_options is set but variants.{name}.mlp is not "moe"')
  with sub.unlocked():
    sub.model = model
  return sub


def layer_values(ev: dict, name: str) -> dict:
  """{layer index: ev['moe/layer{i}/<name>']} over the MoE layers that report it."""
  out = {}
  for key, value in ev.items():
    head, _, rest = key.partition('/')
    layer, _, metric = rest.partition('/')
    if head == 'moe' and layer.startswith('layer') and metric == name:
      out[int(layer.removeprefix('layer'))] = value
  return out


def aux_weights(moe_loss) -> dict:
  return {
    'balance_loss': moe_loss.balance_weight,
    'entropy_loss': moe_loss.entropy_weight,
    'router_z_loss': moe_loss.z_loss_weight,
  }


def parameter_counts(params, eval_metrics: dict) -> dict:
  """Total parameters and parameters activated per token (expert weights x mean k / E per layer)."""
  total = expert_total = active_experts = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, 'key', getattr(k, 'idx', None)) for k in path]
    total += leaf.size
    if keys[-1] in EXPERT_WEIGHTS and leaf.ndim == 3 and 'layers' in keys:
      layer = keys[keys.index('layers') + 1]
      mean_k = eval_metrics[f'moe/layer{layer}/mean_k']
      expert_total += leaf.size
      active_experts += leaf.size * mean_k / leaf.shape[0]
  return {'total': int(total), 'active': float(total - expert_total + active_experts)}


def _fmt(value, spec='.3f'):
  return '–' if value is None else format(value, spec)


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
    ev, counts = row['eval'], row['params']
    cells = [
      name,
      f'{counts["total"] / 1e6:.2f}M',
      f'{counts["active"] / 1e6:.2f}M',
      _fmt(row.get('active_vs_top2'), '.2f'),
      _fmt(ev['loss'], '.4f'),
      *(_fmt(ev.get(f'loss/{t}'), '.4f') for t in task_names),
      _fmt(ev.get('experts_per_token'), '.2f'),
      *(_fmt(ev.get(f'experts_per_token/{t}'), '.2f') for t in task_names),
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
      cells = [
        f'{_fmt(row["layer_mean_k"].get(i), ".2f")} / {_fmt(row["layer_max_k"].get(i), ".0f")}'
        for i in layers
      ]
      lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {_fmt(row["trunc_rate"], ".3f")} |')
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
        cells = [_fmt(rhos.get(i), '.3f') for i in layers]
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
      accs = [row['eval'].get(f'acc/{t}') for t in mc_tasks] + [row['eval'].get('acc')]
      cells = [_fmt(None if a is None else 100 * a, '.1f') for a in accs]
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
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
    steps, values = zip(*row['mean_k_curve']) if row['mean_k_curve'] else ((), ())
    axes['steps'].plot(steps, values, marker='.', label=name)
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


def run(config, workdir: str) -> dict:
  names = variant_names(config)
  check_choice('moe_loss.aux_reduce', config.moe_loss.aux_reduce, lm_task.AUX_REDUCTIONS)
  data = lm_task.build_lm_data(config, workdir)
  evaluators = lm_task.build_evaluators(config, data)
  loss_fn = lm_task.lm_loss_fn(
    config.train.z_loss, aux_weights(config.moe_loss), config.moe_loss.aux_reduce
  )
  rows = {}
  for name in names:
    sub = variant_config(config, name)
    run_dir = os.path.join(workdir, name)
    result = train(
      sub,
      run_dir,
      model_factory=lm_task.model_factory(sub.model),
      loss_fn=loss_fn,
      train_dataset=data.train_dataset,
      evaluate=evaluators.evaluate,
    )
    ev = result.last_eval
    records = read_metrics(run_dir)
    train_records = [r for r in records if 'aux/mean_k' in r]
    rows[name] = {
      'eval': {k: v for k, v in ev.items() if not isinstance(v, list)},
      'layer_mean_k': layer_values(ev, 'mean_k'),
      'layer_max_k': layer_values(ev, 'max_k'),
      'layer_spearman': {
        task: layer_values(ev, 'loss_k_spearman' + ('' if task == 'all' else f'/{task}'))
        for task in ('all', *data.task_names)
      },
      'mean_k_curve': [(r['step'], r['aux/mean_k']) for r in train_records],
      'trunc_rate': train_records[-1].get('aux/trunc_rate') if train_records else None,
      'params': parameter_counts(result.params, ev),
      'step': result.step,
    }
  ref = rows.get(REFERENCE_VARIANT)
  if ref:
    for row in rows.values():
      row['active_vs_top2'] = row['params']['active'] / ref['params']['active']
  tokens = config.train.steps * config.train.batch_size * config.data.seq_len
  table = results_tables(
    rows,
    data.task_names,
    f'{config.data.name}: {len(rows)} variants, {config.train.steps} steps x '
    f'{config.train.batch_size} x {config.data.seq_len} = {tokens:,} training tokens each',
  )
  plots = plot_mean_k(rows, workdir) if jax.process_index() == 0 else []
  plots += plotting.write_loss_curves(workdir, names)
  results = {
    'variants': rows,
    'tokens_per_variant': tokens,
    'task_names': list(data.task_names),
    'plots': [os.path.basename(p) for p in plots],
  }
  write_results(workdir, results, table)
  print(table)
  return results
