"""RLMEC on kj_arith end to end, beside its baselines, over several seeds: the table and the plots.

The stages of the config (`configs/rlmec/arith.py`) run through `kuaijax.stages.run_pipeline` once
per training seed of `config.seeds`, in `<workdir>/seed_<s>/` (stages with a `shared_seed`, e.g. the
repro setting's SFT policy and GRM, once in `<workdir>/shared/`). Re-running the command resumes
(finished stages are kept). This file only builds results.md / results.json (the post-training
table of `kuaijax.stages.posttrain_table`: accuracy per level, greedy, length, multi-run fractions,
paired differences to `config.reference_row`; then the GRM quality against the program teacher and
the stage speeds), loss_curves.png, token_rewards.png and worked_example.md (one sample through
every stage).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from kuaijax import plotting
from kuaijax.data import tokenizers
from kuaijax.results import write_results
from kuaijax.stages import posttrain_table, report, run_pipeline
from kuaijax.stages.base import data_of

QUALITY_KEYS = ('locate_accuracy', 'rewrite_success', 'edit_distance_ratio')
SPEED_KEYS = (
  ('samples', 'sample_accuracy'),
  ('grm_rewrite', 'locate_samples_per_s'),
  ('grm_rewrite', 'rewrite_samples_per_s'),
  ('grm_rewrite', 'rewrite_tokens_per_s'),
  ('rewards', 'scoring_samples_per_s'),
  ('rewards', 'scoring_tokens_per_s'),
)


def grm_summary(runs: dict) -> dict:
  """GRM quality against the program teacher per training seed and [mean, std] over seeds, and the
  stage speeds."""
  quality = {}
  for seed, stages in runs.items():
    q = {}
    if 'grm_rewrite' in stages:
      q.update({k: stages['grm_rewrite']['summary']['quality'][k] for k in QUALITY_KEYS})
    for name, key in (('rewards', 'reward_auc'), ('prog_rewards', 'programmatic_reward_auc')):
      if name in stages:
        q[key] = stages[name]['summary'].get('reward_auc', float('nan'))
    quality[str(seed)] = q
  keys = sorted(set.intersection(*(set(q) for q in quality.values()))) if quality else []
  return {
    'grm_quality': quality,
    'grm_quality_mean': {k: report.mean_std([q[k] for q in quality.values()]) for k in keys},
    'speed': {
      f'{stage}/{key}': report.mean_std([s[stage]['summary'][key] for s in runs.values()])
      for stage, key in SPEED_KEYS
      if all(stage in s for s in runs.values())
    },
  }


def _pct(pair) -> str:
  return f'{100 * pair[0]:.1f} ± {100 * pair[1]:.1f}'


def grm_table(summary: dict, seeds: int) -> str:
  """Markdown: the GRM quality (mean ± std over `seeds` training seeds) and the stage speeds."""
  lines = []
  q = summary['grm_quality_mean']
  if q:
    cell = lambda k, pct: (
      (_pct(q[k]) if pct else f'{q[k][0]:.2f} ± {q[k][1]:.2f}') if k in q else '-'
    )
    lines += [
      f'## GRM quality on the policy samples (mean ± std over {seeds} training seeds)',
      '',
      "locate: the GRM names the program teacher's first wrong step; rewrite: the GRM's rewrite "
      'reaches the gold answer; edit ratio: token edit distance sample -> GRM rewrite over sample -> '
      'teacher rewrite (1 = as minimal); AUC: token rewards of wrong samples separating the tokens '
      'the teacher changes (lower reward) from the rest, 0.5 = chance.',
      '',
      '| locate accuracy (%) | rewrite reaches gold (%) | edit ratio | reward AUC, GRM | '
      'reward AUC, programmatic |',
      '|---:|---:|---:|---:|---:|',
      f'| {cell("locate_accuracy", True)} | {cell("rewrite_success", True)} | '
      f'{cell("edit_distance_ratio", False)} | {cell("reward_auc", False)} | '
      f'{cell("programmatic_reward_auc", False)} |',
      '',
    ]
  if summary['speed']:
    lines += ['| stage metric | mean ± std over seeds |', '|---|---:|']
    for key, (mean, std) in summary['speed'].items():
      lines.append(f'| {key} | {mean:,.3g} ± {std:,.2g} |')
  return '\n'.join(lines) + '\n'


def _pieces(tokenizer, tokens) -> list[str]:
  """Each token's text (byte tokens are single characters; a newline is shown as ⏎)."""
  return [(tokenizer.decode([int(t)]) or '·').replace('\n', '⏎') for t in tokens]


def render_rewards(pieces, rewards, threshold: float = -0.05) -> str:
  """The sample's text with the runs of tokens whose reward is below `threshold` in ⟦ ⟧."""
  out, inside = [], False
  for piece, r in zip(pieces, rewards):
    if (r < threshold) != inside:
      inside = not inside
      out.append('⟦' if inside else '⟧')
    out.append(piece)
  return ''.join(out) + ('⟧' if inside else '')


def _wrong_examples(stages: dict, count: int) -> list[tuple[dict, dict, dict]]:
  """(teacher record, GRM record, reward record) of the first wrong samples with GRM rewards, in
  one seed's stages."""
  teacher, grm_rewrite = data_of(stages['teacher']), data_of(stages['grm_rewrite'])
  rewards = {(r['index'], r['completion']): r for r in data_of(stages['rewards'])}
  out = []
  for t, g in zip(teacher, grm_rewrite):
    r = rewards.get((t['index'], t['completion']))
    if r is not None and t['error_step'] > 0:
      out.append((t, g, r))
    if len(out) == count:
      break
  return out


def plot_token_rewards(examples, tokenizer, path: str) -> str | None:
  """token_rewards.png: the GRM's token rewards of a few wrong samples; shaded: the tokens the
  program teacher's rewrite changes."""
  if not examples:
    return None
  from kuaijax.data.sequences import completion_ids
  from kuaijax.grm import changed_tokens

  fig = Figure(figsize=(16, 2.4 * len(examples)))
  for ax, (t, g, r) in zip(fig.subplots(len(examples), 1, squeeze=False)[:, 0], examples):
    tokens = np.asarray(r['completion_tokens'])
    rewards = np.asarray(r['rewards'])
    changed = changed_tokens(tokens, completion_ids(tokenizer, t['rewrite']))
    x = np.arange(len(rewards))
    for k in np.flatnonzero(changed):
      ax.axvspan(k - 0.5, k + 0.5, color='tab:red', alpha=0.15, lw=0)
    ax.bar(x, rewards, color='tab:blue', width=0.8)
    ax.set_xticks(x, _pieces(tokenizer, tokens), fontsize=6)
    ax.set(ylabel='r_t', ylim=(-0.105, 0.005), xlim=(-0.5, len(x) - 0.5))
    ax.set_title(
      f'first wrong step: teacher [{t["error_step"]}], GRM [{g["error_step"]}] ({g["note"]})',
      fontsize=9,
    )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def worked_example(stages: dict, tokenizer) -> str:
  """Markdown: one wrong sample through teacher, GRM rewrite and token rewards (one seed)."""
  examples = _wrong_examples(stages, 20)
  if not examples:
    return ''
  # prefer a sample whose GRM rewrite reached the gold answer
  t, g, r = next((e for e in examples if e[1]['reaches_gold']), examples[0])
  pieces = _pieces(tokenizer, r['completion_tokens'])
  return '\n'.join(
    [
      f'Question: {t["question"]}',
      '',
      f'Gold solution:\n```\n{t["gold"]}\n```',
      f'Policy sample (wrong):\n```\n{t["completion"]}\n```',
      f'Program teacher: first wrong step [{t["error_step"]}], rewrite:\n```\n{t["rewrite"]}\n```',
      f'GRM: first wrong step [{g["error_step"]}] ({g["note"]}), rewrite (reaches gold: '
      f'{g["reaches_gold"]}):\n```\n{g["rewrite"]}\n```',
      'GRM token rewards of the sample (⟦ ⟧: r_t < -0.05; ⏎ = newline):',
      f'```\n{render_rewards(pieces, r["rewards"])}\n```',
      'Per token (piece: reward): '
      + ' '.join(f'`{p}`:{w:.2f}' for p, w in zip(pieces, r['rewards'])),
      '',
    ]
  )


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  runs = run_pipeline(config, workdir)
  results, table = posttrain_table.summarise(runs, config)
  results.update(grm_summary(runs), wall_s=time.time() - start)
  table += '\n' + grm_table(results, len(runs))
  if jax.process_index() == 0:
    first = runs[config.seeds[0]]
    tokenizer = tokenizers.get_tokenizer(
      config.data.tokenizer, spm_model_path=config.data.spm_model_path or None
    )
    plots = plotting.write_loss_curves(workdir, report.trained_stage_dirs(runs, workdir))
    if 'rewards' in first:
      examples = _wrong_examples(first, 4)
      plots.append(
        plot_token_rewards(examples, tokenizer, os.path.join(workdir, 'token_rewards.png'))
      )
      with open(os.path.join(workdir, 'worked_example.md'), 'w') as f:
        f.write(worked_example(first, tokenizer))
    results['plots'] = [os.path.relpath(p, workdir) for p in plots if p]
  write_results(workdir, json.loads(json.dumps(results, default=float)), table)
  print(table)
  return results
