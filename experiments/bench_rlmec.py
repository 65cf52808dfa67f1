"""Speed of RLMEC's offline stages, measured side by side in one process.

On kj_arith training problems with one model (randomly initialised, or the params of
`config.init_from`), five sides timed through `kuaijax.benchmarking.interleaved` (wall clock,
`bench.warmup` untimed calls of each first, compilation included there; then one call of each side
per round, in turn, over `bench.rounds` rounds):
- sampling: n completions per problem at T / top-p (`sampling.sample_completions`, the same seed
  every call);
- GRM rewriting: the model as `kuaijax.grm.ModelTeacher` (greedy locate + greedy rewrite of every
  sample drawn once before timing);
- reward scoring: the teacher-forced log-probs of each sample after its rewrite prompt
  (`kuaijax.sampling.score_completion_lists`);
- scoring batches vs forward batches: the padded batches `sampling.completion_batches` cuts from
  the same pairs, scored (`sampling.score_completions`, token_logprobs) and as a plain forward pass
  (logits), each batch one jitted call.
The stages are reported as samples/s and tokens/s at the median time, with min-max (tokens:
generated tokens for the first two, all scored positions for reward scoring); scoring vs forward
as padded tokens/s and the per-round ratio scoring tokens/s / forward tokens/s (= forward time /
scoring time), median (min-max). Writes results.json and results.md into the workdir.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from kuaijax import benchmarking, grm, sampling
from kuaijax.data import minimum_edit, sequences, tasks, tokenizers
from kuaijax.results import write_results
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


def scoring_sides(model, prompts, samples, *, batch_size: int):
  """Zero-argument sides: token_logprobs scoring and a plain forward pass (logits) of the same
  padded batches (`sampling.completion_batches`), and the padded token count they process."""
  graphdef, state = nnx.split(model)
  batches = [batch for _, *batch in sampling.completion_batches(prompts, samples, batch_size)]
  rows = []
  for p, p_len, c, c_len in batches:
    slots = np.arange(p.shape[1] + c.shape[1])[None, :]
    segments = (slots < (p_len + c_len)[:, None]).astype(np.int32)
    rows.append((np.concatenate([p, c], axis=1), segments))
  score = jax.jit(lambda state, *b: sampling.score_completions(nnx.merge(graphdef, state), *b)[0])
  forward = jax.jit(lambda state, t, s: nnx.merge(graphdef, state)(t, segment_ids=s)[0])
  sides = {
    'scoring batches': lambda: [score(state, *batch) for batch in batches],
    'forward batches': lambda: [forward(state, *row) for row in rows],
  }
  return sides, sum(t.size for t, _ in rows)


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  bc, dc = config.bench, config.data
  tokenizer = tokenizers.get_tokenizer(dc.tokenizer, spm_model_path=dc.spm_model_path or None)
  model = _model(config)
  records = tasks.get_task('kj_arith').load(
    'train', levels=tuple(dc.levels), limit=bc.problems, data_dir=dc.data_dir
  )

  def sample():
    return sampling.sample_completions(
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

  rollouts = sample()  # the samples the other stages rewrite and score
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

  def rewrite():
    teacher.stats.clear()  # after the run: the counts of the last call
    teacher(cases)

  prompts = [sequences.prompt_ids(tokenizer, teacher.prompts.rewrite_prompt(c)) for c in cases]
  samples = [r.tokens for r in rollouts]
  versus, padded = scoring_sides(model, prompts, samples, batch_size=bc.batch_size)
  sides = {
    'sampling': sample,
    'GRM rewriting': rewrite,
    'reward scoring': lambda: sampling.score_completion_lists(
      model, prompts, samples, batch_size=bc.batch_size
    ),
    **versus,
  }
  times = benchmarking.interleaved(sides, rounds=bc.rounds, warmup=bc.warmup)
  counts = {
    'sampling': (len(rollouts), sum(len(r.tokens) for r in rollouts)),
    'GRM rewriting': (len(cases), teacher.stats['locate/tokens'] + teacher.stats['rewrite/tokens']),
    'reward scoring': (len(samples), sum(len(p) + len(s) for p, s in zip(prompts, samples))),
  }
  ratio = benchmarking.ratio(times['forward batches'], times['scoring batches'])
  results = {
    'device': jax.devices()[0].device_kind,
    'threads': benchmarking.thread_counts(),
    'command': benchmarking.command_line(),
    'num_params': sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
    'stages': {
      name: {
        'samples': n,
        'tokens': t,
        **times[name].summary(),
        'samples_per_s': n / times[name].median,
        'tokens_per_s': t / times[name].median,
      }
      for name, (n, t) in counts.items()
    },
    'scoring_vs_forward': {
      'padded_tokens': padded,
      'samples': len(samples),
      'score': times['scoring batches'].summary(),
      'forward': times['forward batches'].summary(),
      'score_tokens_per_s': padded / times['scoring batches'].median,
      'forward_tokens_per_s': padded / times['forward batches'].median,
      'ratio': ratio.summary(),  # scoring tokens/s / forward tokens/s, per round
    },
  }
  what = (
    f'RLMEC stage speed on {results["device"]} ({results["num_params"]:,} parameters, '
    f'batch {bc.batch_size})'
  )
  lines = [
    '| stage | samples | tokens | samples/s (median) | tokens/s (median) | tokens/s min-max |',
    '|---|---:|---:|---:|---:|---:|',
  ]
  for name, (n, t) in counts.items():
    timing = times[name]
    lines.append(f'| {name} | {n} | {t} | {n / timing.median:,.1f} | {timing.rate_cells(t)} |')
  v = results['scoring_vs_forward']
  lines += [
    '',
    'Tokens: generated tokens for sampling and GRM rewriting (locate + rewrite outputs), all '
    'scored positions (prompt + sample) for reward scoring.',
    '',
    f'| same padded batches ({padded} tokens) | tokens/s (median) | min-max |',
    '|---|---:|---:|',
    f'| reward scoring (token_logprobs) | {times["scoring batches"].rate_cells(padded)} |',
    f'| plain forward (logits) | {times["forward batches"].rate_cells(padded)} |',
    '',
    f'Scoring tokens/s / forward tokens/s, per round: {ratio.text()} '
    f'({v["score_tokens_per_s"]:,.0f} vs {v["forward_tokens_per_s"]:,.0f} tokens/s at the medians).',
  ]
  table = benchmarking.header(what, rounds=bc.rounds, warmup=bc.warmup) + '\n'.join(lines) + '\n'
  write_results(workdir, results, table)
  print(table)
  return results
