"""Perplexity of a Hugging Face model folder on a JSONL file, plus greedy generations; for MoE
models optionally a Top-P routing sweep (mean experts per token and perplexity per p).

The evaluation-only pipeline of configs/hf/eval.py (`kuaijax.stages.run_pipeline`): the 'params'
stage 'base' imports the folder as the model role 'policy', each 'top_p_<p>' stage the same weights
as a role with Top-P routing at p; `config.evals` ('text_perplexity', 'greedy_continuations' of
kuaijax/evals/text_file.py) scores every stage as it is. This module only reads their
`stage.json['eval']` into results.json / results.md and the plots (nll_by_position.png,
top_p_sweep.png).
"""

from __future__ import annotations

import os

import jax
from matplotlib.figure import Figure

from kuaijax.evals.moe_stats import layer_values
from kuaijax.hf import model_io
from kuaijax.results import write_results
from kuaijax.stages import report, roles, run_pipeline
from kuaijax.stages.runner import parse_stage_list

BASE = 'base'
RESULT_KEYS = ('mean_nll', 'perplexity', 'tokens', 'texts', 'truncated_texts')


def sweep_stages(config) -> list[tuple[float, str]]:
  """(p, stage name) of the stages whose model role routes with Top-P, in config.stages order."""
  out = []
  for name in parse_stage_list(config.stages):
    options = config.models[config.stage[name].get('model', 'policy')].get('mlp_options') or {}
    if options.get('routing') == 'top_p':
      out.append((float(options['p']), name))
  return out


def stage_eval(stages: dict, name: str) -> dict:
  ev = stages[name].get('eval') or {}
  if 'mean_nll' not in ev:
    raise ValueError(f'stage {name!r} has no text_perplexity evaluation (config.evals)')
  return ev


def _plot(workdir: str, name: str, xs, ys_list, labels, title, xlabel, ylabel) -> str:
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for ys, label in zip(ys_list, labels, strict=True):
    ax.plot(xs, ys, marker='o' if len(xs) < 30 else None, label=label)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.grid(alpha=0.3)
  if len(labels) > 1:
    ax.legend()
  path = os.path.join(workdir, name)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return path


def sweep_row(p: float, ev: dict) -> dict:
  layers = layer_values(ev, 'mean_k')
  return dict(
    p=p,
    mean_nll=ev['mean_nll'],
    perplexity=ev['perplexity'],
    experts_per_token=ev['experts_per_token'],
    layer_mean_k=[layers[i] for i in sorted(layers)],
    generations=ev.get('generations', []),
  )


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  stages = run_pipeline(config, workdir)[config.seeds[0]]
  base = stage_eval(stages, BASE)
  folder = roles.hf_folder(config, 'policy')
  results = dict(
    model_type=model_io.read_config(folder)['model_type'],
    **{k: base[k] for k in RESULT_KEYS},
    generations=base.get('generations', []),
    seeds=report.seeds_record(config),
  )
  if 'experts_per_token' in base:
    results['experts_per_token'] = base['experts_per_token']
  plot = jax.process_index() == 0
  plots = []
  if plot:
    by_position = base['nll_by_position']
    plots.append(
      _plot(
        workdir,
        'nll_by_position.png',
        range(len(by_position)),
        [by_position],
        ['nll'],
        'next-token NLL by position',
        'position',
        'mean NLL (nats)',
      )
    )
  lines = [
    f'## {results["model_type"]} from {folder}',
    '',
    '| texts | tokens | mean NLL (nats) | perplexity | truncated |',
    '|---:|---:|---:|---:|---:|',
    f'| {results["texts"]} | {results["tokens"]} | {results["mean_nll"]:.4f} | '
    f'{results["perplexity"]:.3f} | {results["truncated_texts"]} |',
  ]
  sweep = [sweep_row(p, stage_eval(stages, name)) for p, name in sweep_stages(config)]
  if sweep:
    results['top_p_sweep'] = sweep
    lines += [
      '',
      '### Top-P routing on the pretrained MoE (k_max = all experts)',
      '',
      '| p | experts per token | per layer | mean NLL | perplexity |',
      '|---:|---:|---|---:|---:|',
    ]
    for row in sweep:
      per_layer = ', '.join(f'{k:.2f}' for k in row['layer_mean_k'])
      lines.append(
        f'| {row["p"]:g} | {row["experts_per_token"]:.2f} | {per_layer} | '
        f'{row["mean_nll"]:.4f} | {row["perplexity"]:.3f} |'
      )
    if plot:
      plots.append(
        _plot(
          workdir,
          'top_p_sweep.png',
          [r['p'] for r in sweep],
          [[r['experts_per_token'] for r in sweep], [r['perplexity'] for r in sweep]],
          ['experts per token', 'perplexity'],
          'Top-P routing on a pretrained MoE',
          'p',
          'value',
        )
      )
  lines += ['', '### Greedy generations', '']
  for s in results['generations']:
    lines.append(f'- prompt: `{s["prompt"]!r}`\n  completion: `{s["completion"]!r}`')
  results['plots'] = [os.path.basename(p) for p in plots]
  write_results(workdir, results, '\n'.join(lines) + '\n')
  return results
