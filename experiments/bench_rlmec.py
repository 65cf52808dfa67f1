"""Speed of RLMEC's offline stages, measured side by side in one process.

On kj_arith training problems with one model (randomly initialised, or the params of
`config.init_from`): sampling (n completions per problem at T / top-p), GRM rewriting (the model as
`kuaijax.grm.ModelTeacher`: greedy locate + greedy rewrite of every sample) and reward scoring (the
teacher-forced log-probs of each sample after its rewrite prompt,
`kuaijax.sampling.score_completion_lists`), each as samples/s and tokens/s (generated tokens for the
first two, all scored positions for the last), timed on a second call so compilation is excluded. Reward scoring is also compared with a
plain forward pass (logits) of the same padded batches (`kuaijax.grm.benchmark_scoring`). Writes
results.json and results.md into the workdir.
"""

from __future__ import annotations

import os
import time

import jax
from flax import nnx

from kuaijax import grm
from kuaijax.data import minimum_edit, sequences, tasks, tokenizers
from kuaijax.results import write_results
from kuaijax.sampling import sample_completions, score_completion_lists
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train import lm_task
from kuaijax.train.trainer import param_layout


def _model(config):
  """A fresh model (seed train.seed), or the params of config.init_from when given."""
  factory = lm_task.model_factory(config.model)
  if not config.init_from:
    return factory(nnx.Rngs(config.train.seed))
  layout = param_layout(config, factory)
  params, _ = ckpt_lib.load_params(config.init_from, layout.abstract_params, layout.shardings)
  return nnx.merge(layout.graphdef, params)


def _timed(fn):
  """(result, seconds) of the second of two calls (the first compiles)."""
  fn()
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  bc, dc = config.bench, config.data
  tokenizer = tokenizers.get_tokenizer(dc.tokenizer, spm_model_path=dc.spm_model_path or None)
  model = _model(config)
  records = tasks.get_task('kj_arith').load(
    'train', levels=tuple(dc.levels), limit=bc.problems, data_dir=dc.data_dir
  )
  rollouts, seconds = _timed(
    lambda: sample_completions(
      model,
      tokenizer,
      [r['prompt'] for r in records],
      num_samples=bc.num_samples,
      temperature=bc.temperature,
      top_p=bc.top_p,
      max_new_tokens=dc.max_new_tokens,
      prompt_len=dc.prompt_len,
      batch_size=bc.batch_size,
    )
  )
  tokens = sum(len(r.tokens) for r in rollouts)
  rows = {'sampling': (len(rollouts), tokens, seconds)}
  cases = [
    minimum_edit.Case(r['question'], r['completion'], str(r['answer']), s.text)
    for s in rollouts
    for r in [records[s.index]]
  ]
  teacher = grm.ModelTeacher(
    model,
    tokenizer,
    max_prompt_len=bc.grm_prompt_len,
    max_new_tokens=dc.max_new_tokens,
    batch_size=bc.batch_size,
  )
  teacher(cases)  # compile
  teacher.stats.clear()
  _, seconds = _timed(lambda: teacher(cases))
  tokens = teacher.stats['locate/tokens'] + teacher.stats['rewrite/tokens']
  rows['GRM rewriting'] = (len(cases), tokens, seconds)
  prompts = [sequences.prompt_ids(tokenizer, teacher.prompts.rewrite_prompt(c)) for c in cases]
  samples = [r.tokens for r in rollouts]
  score = lambda: score_completion_lists(model, prompts, samples, batch_size=bc.batch_size)
  _, seconds = _timed(score)
  tokens = sum(len(p) + len(s) for p, s in zip(prompts, samples))
  rows['reward scoring'] = (len(samples), tokens, seconds)
  versus = grm.benchmark_scoring(model, prompts, samples, batch_size=bc.batch_size)
  results = {
    'device': jax.devices()[0].device_kind,
    'num_params': sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
    'stages': {
      name: {'samples': n, 'tokens': t, 'seconds': s, 'samples_per_s': n / s, 'tokens_per_s': t / s}
      for name, (n, t, s) in rows.items()
    },
    'scoring_vs_forward': versus,
  }
  lines = [
    f'## RLMEC stage speed on {results["device"]} ({results["num_params"]:,} parameters, '
    f'batch {bc.batch_size})',
    '',
    '| stage | samples | tokens | samples/s | tokens/s |',
    '|---|---:|---:|---:|---:|',
  ]
  for name, r in results['stages'].items():
    lines.append(
      f'| {name} | {r["samples"]} | {r["tokens"]} | {r["samples_per_s"]:,.1f} | '
      f'{r["tokens_per_s"]:,.0f} |'
    )
  lines += [
    '',
    'Tokens: generated tokens for sampling and GRM rewriting (locate + rewrite outputs), all '
    'scored positions (prompt + sample) for reward scoring.',
    '',
    '| same padded batches | tokens/s |',
    '|---|---:|',
    f'| reward scoring (token_logprobs) | {versus["score_tokens_per_s"]:,.0f} |',
    f'| plain forward (logits) | {versus["forward_tokens_per_s"]:,.0f} |',
    f'| ratio | {versus["ratio"]:.2f} |',
  ]
  table = '\n'.join(lines) + '\n'
  write_results(workdir, results, table)
  print(table)
  return results
