"""Speed of asking k times: k paths per question in ONE batched generate call vs k single calls.

A randomly initialised decoder LM (a path stops early only if it happens to sample eos, p ~ 1/259
per token, alike in both modes) samples k paths for each of `questions` prompts: once with
`aggregate.sample_paths(k=k)` (the prompt is prefilled once and its KV cache copied per path), and
once as k calls with k=1 (each prefilling the prompt again). The two sides are timed through
`kuaijax.benchmarking.interleaved`: wall clock, `bench.warmup` untimed calls of each first
(compilation), then one call of each per round, in turn, over `bench.rounds` rounds. Writes
results.json and results.md (paths/s, median and min-max, and the ratio single / batched time as
the median (min-max) of per-round ratios) into the workdir.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from kuaijax import benchmarking
from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.inference import aggregate
from kuaijax.models.transformer import Transformer, TransformerConfig
from kuaijax.results import write_results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  bc = config.bench
  model = Transformer(TransformerConfig.from_config(config.model), rngs=nnx.Rngs(0))
  tokenizer = ByteTokenizer()
  prompts = [
    f'Question: problem number {i} with some words. Solution:\n' for i in range(bc.questions)
  ]
  options = dict(max_new_tokens=bc.max_new_tokens, prompt_len=bc.prompt_len, temperature=0.7)
  sides = {
    'batched': lambda: aggregate.sample_paths(model, tokenizer, prompts, k=bc.k, seed=0, **options),
    'single_calls': lambda: [
      aggregate.sample_paths(model, tokenizer, prompts, k=1, seed=s, **options) for s in range(bc.k)
    ],
  }
  times = benchmarking.interleaved(sides, rounds=bc.rounds, warmup=bc.warmup)
  batched, single = times['batched'], times['single_calls']
  ratio = benchmarking.ratio(single, batched)
  paths = bc.questions * bc.k
  results = {
    'paths': paths,
    'batched': batched.summary(),
    'single_calls': single.summary(),
    'batched_s': batched.median,
    'single_calls_s': single.median,
    'paths_per_s_batched': paths / batched.median,
    'paths_per_s_single_calls': paths / single.median,
    'ratio': ratio.summary(),  # single-calls time / batched time, per round
    'device': jax.devices()[0].device_kind,
    'threads': benchmarking.thread_counts(),
    'command': benchmarking.command_line(),
  }
  what = (
    f'k={bc.k} paths for {bc.questions} questions ({bc.max_new_tokens} new tokens each, '
    f'{results["device"]})'
  )
  table = (
    benchmarking.header(what, rounds=bc.rounds, warmup=bc.warmup)
    + '| mode | paths/s (median) | min-max |\n|---|---:|---:|\n'
    + f'| one batched call (num_samples=k) | {batched.rate_cells(paths, ".1f")} |\n'
    + f'| {bc.k} single calls | {single.rate_cells(paths, ".1f")} |\n\n'
    + f'Ratio (time of the single calls / the batched call, per round): {ratio.text()}\n'
  )
  write_results(workdir, results, table)
  print(table)
  return results
