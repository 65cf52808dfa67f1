"""PCformer / ODE Transformer / HARPE on kj_lm_mixture: one LM per variant, two tables, plots.

The training is the pipeline of configs/pcformer/lm.py (`kuaijax.stages.run_pipeline`): every
variant is a model role (`config.models.<name>`: the base decoder with its layer stack) trained by a
'pretrain' stage on the same data in the same order (the lm experiment's data, loss and evaluator,
`kuaijax.train.lm_task`) into `<workdir>/seed_<s>/<name>/`; the stages of `vanilla` and `harpe` also
run the passkey retrieval evaluator once on their final parameters (`final_evals`).

This file reads the stages' stage.json and metrics.jsonl and writes the tables and plots. Table 1:
validation loss per task, perplexity, parameters, block evaluations per token and training tokens/s.
Table 2: needle retrieval accuracy (kuaijax.evals.passkey) at the training length and beyond for the
stages that ran it (single-base RoPE vs HARPE). Both show mean ± std over training seeds when there
are several. Plots: the learned alpha per layer and the corrector matrices W / Wc of every PC
variant (first training seed), and the loss curves of every variant. Writes results.json, results.md and the
PNGs.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from kuaijax import plotting
from kuaijax.models.transformer import TransformerConfig
from kuaijax.results import write_results
from kuaijax.stages import base, report, roles, run_pipeline
from kuaijax.train.metrics import read_metrics

RETRIEVAL_PREFIX = 'passkey/'


def training_tokens_per_s(history: list[dict]) -> float:
  """Median tokens/s over the logged intervals, the first (which includes compilation) left out."""
  rates = [r['tokens_per_s'] for r in history if r.get('tokens_per_s')]
  rates = rates[1:] if len(rates) > 1 else rates
  return float(np.median(rates)) if rates else float('nan')


def learned_stack_params(model) -> dict:
  """alpha per layer and the square W / Wc of a PC model (empty for other stacks)."""
  stack = model.stack
  if stack.spec.kind != 'pc':
    return {}
  alphas = [np.asarray(stack.layer_alpha(i)).tolist() for i in range(stack.num_layers)]
  w, wc = stack.matrices()
  return {
    'alpha_type': stack.alpha_type,
    'alpha': alphas,
    'W': np.asarray(w).tolist(),
    'Wc': np.asarray(wc).tolist(),
  }


def plot_stack_params(learned: dict, workdir: str) -> list[str]:
  """alpha.png (alpha per layer, one line per PC variant) and <variant>_corrector.png (W, Wc)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  paths = []
  if not learned:
    return paths
  fig, ax = plt.subplots(figsize=(5, 3.2))
  for name, p in learned.items():
    alpha = np.asarray(p['alpha'], np.float64)
    mean = alpha.reshape(len(alpha), -1).mean(axis=1)
    layers = np.arange(1, len(mean) + 1)
    ax.plot(layers, mean, marker='o', label=f'{name} ({p["alpha_type"]})')
    if alpha.ndim == 2:  # per-channel: show the spread over channels
      ax.fill_between(layers, alpha.min(axis=1), alpha.max(axis=1), alpha=0.2)
  ax.axhline(0.5, color='gray', lw=0.8, ls='--', label='init 0.5')
  ax.set_xticks(np.arange(1, max(len(p['alpha']) for p in learned.values()) + 1))
  ax.set(xlabel='layer', ylabel='alpha (EMA coefficient)', title='Learned predictor alpha')
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(os.path.join(workdir, 'alpha.png'))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  for name, p in learned.items():
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    for ax, key in zip(axes, ('W', 'Wc'), strict=True):
      m = np.asarray(p[key])
      masked = np.ma.masked_where(np.triu(np.ones_like(m), 1) > 0, m)
      im = ax.imshow(masked, cmap='viridis')
      for (r, c), v in np.ndenumerate(m):
        if c <= r:
          ax.text(c, r, f'{v:.2f}', ha='center', va='center', fontsize=6, color='w')
      ax.set(title=f'{name}: {key}', xlabel='history entry k', ylabel='layer i')
      fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    paths.append(os.path.join(workdir, f'{name}_corrector.png'))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths


def comparison_table(task_names, rows: list[dict], title: str) -> str:
  """Markdown: one row per variant, validation loss per task, ppl, params, evals/token, tokens/s."""
  head = ' | '.join(f'{t} loss' for t in task_names)
  lines = [
    f'## {title}',
    '',
    f'| variant | stack | layers | params | block evals/token | {head} | all loss | all ppl | '
    'train tokens/s |',
    '|---|---|---:|---:|---:|' + '---:|' * len(task_names) + '---:|---:|---:|',
  ]
  for r in rows:
    ev, std = r['eval'], r['eval_std']
    losses = ' | '.join(report.cell(ev, std, f'loss/{t}') for t in task_names)
    lines.append(
      f'| {r["variant"]} | {r["stack"]} | {r["num_layers"]} | {r["num_params"]:,} | '
      f'{r["block_evals_per_token"]} | {losses} | {report.cell(ev, std, "loss")} | '
      f'{report.cell(ev, std, "ppl", ".2f")} | {r["tokens_per_s"]:,.0f} |'
    )
  return '\n'.join(lines) + '\n'


def retrieval_table(retrieval: dict, train_len: int, spread: str) -> str:
  """Markdown: accuracy (answer loss) per variant and context length."""
  lengths = sorted({int(n) for r in retrieval.values() for n in r['by_length']})
  cols = ' | '.join(f'{n}{" (train)" if n == train_len else ""}' for n in lengths)
  templates = ', '.join(sorted({r['template'] for r in retrieval.values()}))
  lines = [
    f'## Needle retrieval ({templates} template): accuracy (answer loss, nats/token) by context '
    f'length; {spread}',
    '',
    f'| variant | RoPE | {cols} |',
    '|---|---|' + '---:|' * len(lengths),
  ]
  for name, r in retrieval.items():
    cells = []
    for n in lengths:
      m = r['by_length'].get(str(n), {})
      std = {k.removesuffix('_std'): v for k, v in m.items() if k.endswith('_std')}
      acc, loss = report.cell(m, std, 'accuracy', '.3f'), report.cell(m, std, 'answer_loss', '.3f')
      cells.append(f'{acc} ({loss})')
    lines.append(f'| {name} | {r["rope"]} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _rope_description(cfg: TransformerConfig) -> str:
  if cfg.rope_heads == 'single':
    return f'single base {cfg.rope_base:g}'
  bases = ', '.join(f'{b:g}' for b in cfg.kv_rope_bases)
  return f'HARPE {cfg.rope_heads} [{bases}]'


def retrieval_by_length(ev: dict, std: dict) -> dict:
  """{length: {'accuracy', 'answer_loss'} (+ '_std' entries over seeds)} from `passkey/...` keys."""
  out = {}
  for key, value in ev.items():
    if key.startswith(RETRIEVAL_PREFIX):
      length, metric = key.removeprefix(RETRIEVAL_PREFIX).split('/')
      out.setdefault(length, {})[metric] = value
      if key in std:
        out[length][f'{metric}_std'] = std[key]
  return dict(sorted(out.items(), key=lambda item: int(item[0])))


def variant_row(config, runs: dict, name: str) -> dict:
  """Table 1's row of stage `name`: evaluation over training seeds, size, compute, tokens/s."""
  infos = [stages[name] for stages in runs.values()]
  cfg = TransformerConfig.from_config(roles.model_section(config, infos[0]['model']))
  ev, std = report.eval_over_seeds([info['eval'] for info in infos])
  rates = [training_tokens_per_s(read_metrics(info['dir'])) for info in infos]
  return {
    'variant': name,
    'stack': cfg.stack,
    'num_layers': cfg.num_layers,
    'num_params': infos[0]['summary']['params']['total'],
    'block_evals_per_token': cfg.num_layers * cfg.stack_spec.evaluations,
    'tokens_per_s': float(np.mean(rates)),
    'step': infos[0]['summary']['steps'],
    'eval': ev,
    'eval_std': std,
  }


def run(config, workdir: str) -> dict:
  runs = run_pipeline(config, workdir)
  first = runs[config.seeds[0]]
  names = [n for n, info in first.items() if info['type'] == 'pretrain']
  rows = [variant_row(config, runs, name) for name in names]
  learned, retrieval = {}, {}
  for row in rows:
    name, info = row['variant'], first[row['variant']]
    cfg = TransformerConfig.from_config(roles.model_section(config, info['model']))
    if cfg.stack_spec.kind == 'pc':
      graphdef, params = roles.load(config, base.params_of(info))
      learned[name] = learned_stack_params(nnx.merge(graphdef, params))
    by_length = retrieval_by_length(row['eval'], row['eval_std'])
    if by_length:
      passkey = [e for e in info['block']['final_evals'].values() if e['type'] == 'passkey']
      template = passkey[0]['template'] if passkey else ''
      retrieval[name] = {
        'rope': _rope_description(cfg),
        'template': template,
        'by_length': by_length,
      }
  plots = plot_stack_params(learned, workdir) + plotting.write_loss_curves(
    workdir, report.trained_stage_dirs(runs, workdir, ('pretrain',))
  )
  seq_len = config.data.seq_len
  table = comparison_table(
    config.data.task_names,
    rows,
    f'Validation loss per task ({config.data.name}, {rows[0]["step"]} steps, seq_len {seq_len}; '
    f'{report.spread_note(runs)})',
  )
  differences = report.paired_differences(runs, names, 'vanilla') if 'vanilla' in names else []
  if differences:
    table += '\n' + report.differences_table(differences, 'vanilla')
  if retrieval:
    table += '\n' + retrieval_table(retrieval, seq_len, report.spread_note(runs))
  results = {
    'variants': rows,
    'differences_to_vanilla': differences,
    'learned': learned,
    'retrieval': retrieval,
    'seeds': report.seeds_record(config),
    'runs': report.without_blocks(runs),
    'plots': [os.path.basename(p) for p in plots],
  }
  write_results(workdir, results, table)
  print(table)
  return results
