"""Benchmark: fused token log-probs vs the naive logits-materialising version, forward + backward.

  python -m pallas_kernels.token_logprobs.bench --out DIR [--tokens 4096 --d 512 --vocab 32768]
    [--rounds 5 --warmup 1]

For every implementation that runs on this backend, measures the compiled program's memory
(`memory_analysis()`: temporaries, and temporaries + arguments + outputs as the peak) and the wall
time of value-and-grad of sum(g1 * logprob + g2 * entropy) w.r.t. hidden and lm_head through
`kuaijax.benchmarking.interleaved` (--warmup calls excluded, the programs called in turn over
--rounds rounds), each as a ratio to the naive version measured in the same process (time: the
median (min-max) of per-round ratios). Writes token_logprobs.json/.md.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from kuaijax import benchmarking
from pallas_kernels.common import markdown_table, write_report
from pallas_kernels.token_logprobs.api import token_logprobs
from pallas_kernels.token_logprobs.reference import token_logprobs_reference


def fwd_bwd(score_fn):
  """A jitted (hidden, lm_head, targets, g1, g2) -> (loss, (d hidden, d lm_head))."""

  def loss(hidden, lm_head, targets, g1, g2):
    lp, ent = score_fn(hidden, lm_head, targets)
    return jnp.sum(g1 * lp) + jnp.sum(g2 * ent)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def memory(fn, *args) -> dict:
  """Temporary and peak (temporaries + arguments + outputs - aliased) bytes of the compiled fn."""
  stats = fn.lower(*args).compile().memory_analysis()
  temp = int(stats.temp_size_in_bytes)
  peak = temp + int(
    stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
  )
  return {'temp_bytes': temp, 'peak_bytes': peak}


def available_implementations() -> list[str]:
  backend = jax.default_backend()
  return ['xla', 'pallas'] if backend in ('gpu', 'cuda', 'rocm', 'tpu') else ['xla']


def run(
  tokens: int,
  d: int,
  vocab: int,
  dtype: str,
  rounds: int,
  warmup: int,
  chunk_size: int | None,
) -> dict:
  keys = jax.random.split(jax.random.key(0), 5)
  dt = jnp.dtype(dtype)
  hidden = jax.random.normal(keys[0], (tokens, d), jnp.float32).astype(dt)
  lm_head = (jax.random.normal(keys[1], (d, vocab), jnp.float32) * d**-0.5).astype(dt)
  targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
  g1 = jax.random.normal(keys[3], (tokens,))
  g2 = jax.random.normal(keys[4], (tokens,))
  args = (hidden, lm_head, targets, g1, g2)

  fns = {'naive': fwd_bwd(token_logprobs_reference)}
  for impl in available_implementations():
    fns[impl] = fwd_bwd(
      lambda h, w, y, impl=impl: token_logprobs(h, w, y, implementation=impl, chunk_size=chunk_size)
    )
  mems = {name: memory(fn, *args) for name, fn in fns.items()}
  times = benchmarking.interleaved(
    {name: functools.partial(fn, *args) for name, fn in fns.items()}, rounds=rounds, warmup=warmup
  )
  rows = []
  for name in fns:
    t = times[name]
    row = {
      'implementation': name,
      **mems[name],
      'seconds': t.median,
      'min-max s': f'{t.low:.4g}-{t.high:.4g}',
      'timing': t.summary(),
    }
    if name != 'naive':
      time_ratio = benchmarking.ratio(t, times['naive'])
      row.update(
        temp_ratio=mems[name]['temp_bytes'] / mems['naive']['temp_bytes'],
        peak_ratio=mems[name]['peak_bytes'] / mems['naive']['peak_bytes'],
        time_ratio=time_ratio.text(),
        time_ratio_summary=time_ratio.summary(),
      )
    rows.append(row)
  return {
    'backend': jax.default_backend(),
    'device': str(jax.devices()[0].device_kind),
    'shape': {'tokens': tokens, 'd': d, 'vocab': vocab, 'dtype': dtype},
    'threads': benchmarking.thread_counts(),
    'command': benchmarking.command_line(),
    'rounds': rounds,
    'warmup': warmup,
    'chunk_size': chunk_size,
    'goals': {'peak_ratio': 0.25, 'time_ratio_cpu': 1.2},
    'rows': rows,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='directory for token_logprobs.json/.md')
  parser.add_argument('--tokens', type=int, default=4096)
  parser.add_argument('--d', type=int, default=512)
  parser.add_argument('--vocab', type=int, default=32768)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--rounds', type=int, default=5, help='interleaved timed rounds (>= 5)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls of each program first')
  parser.add_argument('--chunk_size', type=int, default=None)
  args = parser.parse_args(argv)
  result = run(
    args.tokens, args.d, args.vocab, args.dtype, args.rounds, args.warmup, args.chunk_size
  )
  s = result['shape']
  what = (
    f'token_logprobs fwd+bwd, T={s["tokens"]} d={s["d"]} V={s["vocab"]} {s["dtype"]} on '
    f'{result["backend"]} ({result["device"]}); ratios vs naive (goal peak <= 0.25, time on CPU '
    '<= 1.2; time: median (min-max) of per-round ratios)'
  )
  columns = ['implementation', 'temp_bytes', 'peak_bytes', 'seconds', 'min-max s']
  columns += ['temp_ratio', 'peak_ratio', 'time_ratio']
  table = benchmarking.header(what, rounds=args.rounds, warmup=args.warmup)
  table += markdown_table(result['rows'], columns)
  write_report(args.out, 'token_logprobs', result, table)
  print(table)
  return result


if __name__ == '__main__':
  main()
