"""PCformer / ODE Transformer / HARPE on kj_lm_mixture: one LM run per variant, two tables, plots.

Every variant trains the decoder LM of `config.model` with its own model overrides
(`config.variants[name]`) on the same data in the same order (the lm experiment's data, loss and
evaluator, `kuaijax.train.lm_task`), in `workdir/<name>`. Table 1: validation loss per task,
perplexity, parameters, block evaluations per token and training tokens/s. Table 2: needle
retrieval accuracy (kuaijax.evals.passkey) at the training length and beyond for those variants of
`config.retrieval.variants` that run (single-base RoPE vs HARPE). Plots: the learned alpha per layer and
the corrector matrices W / Wc of every PC variant, and the loss curves of every variant. Writes
results.json, results.md and the PNGs.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from kuaijax import parallel, plotting
from kuaijax.evals.passkey import evaluate_retrieval
from kuaijax.models.transformer import TransformerConfig
from kuaijax.results import write_results
from kuaijax.train import lm_task
from kuaijax.train.trainer import train


def variant_config(config, name: str) -> ml_collections.ConfigDict:
  """The experiment config with `config.variants[name]` applied to its model section."""
  if name not in config.variants:
    raise ValueError(f'variant {name!r} is not in config.variants ({sorted(config.variants)})')
  out = ml_collections.ConfigDict(config.to_dict())
  out.model.update(config.variants[name].to_dict())
  return out


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
    ev = r['eval']
    losses = ' | '.join(f'{ev.get(f"loss/{t}", float("nan")):.4f}' for t in task_names)
    lines.append(
      f'| {r["variant"]} | {r["stack"]} | {r["num_layers"]} | {r["num_params"]:,} | '
      f'{r["block_evals_per_token"]} | {losses} | {ev["loss"]:.4f} | {ev["ppl"]:.2f} | '
      f'{r["tokens_per_s"]:,.0f} |'
    )
  return '\n'.join(lines) + '\n'


def retrieval_table(retrieval: dict, train_len: int, template: str) -> str:
  """Markdown: accuracy (answer loss) per variant and context length."""
  lengths = sorted({int(n) for r in retrieval.values() for n in r['by_length']})
  cols = ' | '.join(f'{n}{" (train)" if n == train_len else ""}' for n in lengths)
  lines = [
    f'## Needle retrieval ({template} template): accuracy (answer loss, nats/token) by context length',
    '',
    f'| variant | RoPE | {cols} |',
    '|---|---|' + '---:|' * len(lengths),
  ]
  for name, r in retrieval.items():
    cells = ' | '.join(
      f'{r["by_length"][n]["accuracy"]:.3f} ({r["by_length"][n]["answer_loss"]:.3f})'
      for n in lengths
    )
    lines.append(f'| {name} | {r["rope"]} | {cells} |')
  return '\n'.join(lines) + '\n'


def _rope_description(cfg: TransformerConfig) -> str:
  if cfg.rope_heads == 'single':
    return f'single base {cfg.rope_base:g}'
  bases = ', '.join(f'{b:g}' for b in cfg.kv_rope_bases)
  return f'HARPE {cfg.rope_heads} [{bases}]'


def run(config, workdir: str) -> dict:
  names = list(config.run_variants)
  unknown = [n for n in (*names, *config.retrieval.variants) if n not in config.variants]
  if unknown:
    raise ValueError(f'unknown variants {unknown}; config.variants has {sorted(config.variants)}')
  data = lm_task.build_lm_data(config, workdir)
  mesh = parallel.mesh_from_config(config.parallel)
  evaluators = lm_task.build_evaluators(config, data)
  rows, learned, retrieval = [], {}, {}
  for name in names:
    vconfig = variant_config(config, name)
    cfg = TransformerConfig.from_config(vconfig.model)
    result = train(
      vconfig,
      os.path.join(workdir, name),
      model_factory=lm_task.model_factory(vconfig.model),
      loss_fn=lm_task.lm_loss_fn(vconfig.train.z_loss),
      train_dataset=data.train_dataset,
      evaluate=evaluators.evaluate,
    )
    model = result.model()
    rows.append(
      {
        'variant': name,
        'stack': cfg.stack,
        'num_layers': cfg.num_layers,
        'num_params': int(sum(x.size for x in jax.tree.leaves(result.params))),
        'block_evals_per_token': cfg.num_layers * cfg.stack_spec.evaluations,
        'tokens_per_s': training_tokens_per_s(result.history),
        'step': result.step,
        'eval': result.last_eval,
      }
    )
    if cfg.stack_spec.kind == 'pc':
      learned[name] = learned_stack_params(model)
    if name in config.retrieval.variants:
      with parallel.axis_rules(mesh, config.parallel.rules):
        by_length = evaluate_retrieval(
          model,
          data.tokenizer,
          list(config.retrieval.context_lengths),
          depths=list(config.retrieval.depths),
          per_depth=config.retrieval.per_depth,
          batch_size=config.retrieval.batch_size,
          template=config.retrieval.template,
        )
      retrieval[name] = {'rope': _rope_description(cfg), 'by_length': by_length}
  plots = plot_stack_params(learned, workdir) + plotting.write_loss_curves(workdir, names)
  table = comparison_table(
    data.task_names,
    rows,
    f'Validation loss per task ({config.data.name}, {rows[0]["step"]} steps, seq_len '
    f'{config.data.seq_len})',
  )
  if retrieval:
    table += '\n' + retrieval_table(retrieval, config.data.seq_len, config.retrieval.template)
  results = {
    'variants': rows,
    'learned': learned,
    'retrieval': {
      n: {**r, 'by_length': {str(k): v for k, v in r['by_length'].items()}}
      for n, r in retrieval.items()
    },
    'plots': [os.path.basename(p) for p in plots],
  }
  write_results(workdir, results, table)
  print(table)
  return results
