"""Speed of asking k times: k paths per question in ONE batched generate call vs k single calls.

A randomly initialised decoder LM (a path stops early only if it happens to sample eos, p ~ 1/259
per token, alike in both modes) samples k paths for each of `questions` prompts: once with `aggregate.sample_paths(k=k)` (the
prompt is prefilled once and its KV cache copied per path), and once as k calls with k=1 (each
prefilling the prompt again). Both are compiled before timing and timed side by side, best of
`rounds`. Writes results.json and results.md (paths/s and the ratio) into the workdir.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
from flax import nnx

from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.inference import aggregate
from kuaijax.models.transformer import Transformer, TransformerConfig
from kuaijax.results import write_results


def _best(fn, rounds: int) -> float:
  fn()
  best = float('inf')
  for _ in range(rounds):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  bc = config.bench
  os.makedirs(workdir, exist_ok=True)
  model = Transformer(TransformerConfig.from_config(config.model), rngs=nnx.Rngs(0))
  tokenizer = ByteTokenizer()
  prompts = [
    f'Question: problem number {i} with some words. Solution:\n' for i in range(bc.questions)
  ]
  options = dict(max_new_tokens=bc.max_new_tokens, prompt_len=bc.prompt_len, temperature=0.7)
  batched = lambda: aggregate.sample_paths(model, tokenizer, prompts, k=bc.k, seed=0, **options)
  single = lambda: [
    aggregate.sample_paths(model, tokenizer, prompts, k=1, seed=s, **options) for s in range(bc.k)
  ]
  t_batched, t_single = _best(batched, bc.rounds), _best(single, bc.rounds)
  paths = bc.questions * bc.k
  results = {
    'paths': paths,
    'batched_s': t_batched,
    'single_calls_s': t_single,
    'paths_per_s_batched': paths / t_batched,
    'paths_per_s_single_calls': paths / t_single,
    'ratio': t_single / t_batched,
    'device': jax.devices()[0].device_kind,
  }
  table = (
    f'## k={bc.k} paths for {bc.questions} questions ({bc.max_new_tokens} new tokens each, '
    f'{results["device"]})\n\n| mode | paths/s |\n|---|---:|\n'
    f'| one batched call (num_samples=k) | {results["paths_per_s_batched"]:.1f} |\n'
    f'| {bc.k} single calls | {results["paths_per_s_single_calls"]:.1f} |\n\n'
    f'Ratio: {results["ratio"]:.2f}x\n'
  )
  write_results(workdir, results, table)
  print(table)
  return results
