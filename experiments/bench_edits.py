"""Speed of RLMEC's imitation weights: `kuaijax.data.edits.imitation_weights_batch` on two kinds of pairs.

`bench.num_pairs` random samples of `bench.length` tokens (ids below `bench.vocab`, seed
`bench.seed`), each paired twice:
- RLMEC-like: the rewrite keeps the sample up to a random cut and continues differently (the core
  after the common prefix is random in size, as after a minimum edit);
- unrelated: an independent random token list (the worst case: no prefix or suffix to skip).
The two sides (one `imitation_weights_batch` call over all pairs each; the alignment runs on the
host CPU whatever the default backend) are timed through `kuaijax.benchmarking.interleaved`: wall
clock, `bench.warmup` untimed calls of each first (compilation, once per shape bucket), then one
call of each per round, in turn, over `bench.rounds` rounds. Writes results.json and results.md
(pairs/s, median and min-max, and the ratio unrelated / RLMEC-like time as the median (min-max) of
per-round ratios) into the workdir.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from kuaijax import benchmarking
from kuaijax.data import edits
from kuaijax.results import write_results

SIDES = ('rlmec_like', 'unrelated')


def pairs(num_pairs: int, length: int, vocab: int, seed: int):
  """(samples, RLMEC-like rewrites, unrelated rewrites): lists of `num_pairs` int arrays."""
  rng = np.random.default_rng(seed)
  samples = [rng.integers(0, vocab, length) for _ in range(num_pairs)]
  rewrites = []
  for x in samples:
    cut = int(rng.integers(0, length))
    rewrites.append(np.concatenate([x[:cut], rng.integers(0, vocab, length - cut)]))
  unrelated = [rng.integers(0, vocab, length) for _ in range(num_pairs)]
  return samples, rewrites, unrelated


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  bc = config.bench
  samples, rewrites, unrelated = pairs(bc.num_pairs, bc.length, bc.vocab, bc.seed)
  sides = {
    'rlmec_like': lambda: edits.imitation_weights_batch(samples, rewrites),
    'unrelated': lambda: edits.imitation_weights_batch(samples, unrelated),
  }
  times = benchmarking.interleaved(sides, rounds=bc.rounds, warmup=bc.warmup)
  ratio = benchmarking.ratio(times['unrelated'], times['rlmec_like'])
  results = {
    'num_pairs': bc.num_pairs,
    'length': bc.length,
    **{name: times[name].summary() for name in SIDES},
    **{f'{name}_pairs_per_s': bc.num_pairs / times[name].median for name in SIDES},
    'ratio': ratio.summary(),  # unrelated time / RLMEC-like time, per round
    'device': 'host CPU',  # the alignment runs there whatever the default backend
    'threads': benchmarking.thread_counts(),
    'command': benchmarking.command_line(),
  }
  what = (
    f'RLMEC imitation weights (edits.imitation_weights_batch), {bc.num_pairs} pairs of '
    f'{bc.length} tokens, host CPU'
  )
  table = (
    benchmarking.header(what, rounds=bc.rounds, warmup=bc.warmup)
    + '| pairs | pairs/s (median) | min-max |\n|---|---:|---:|\n'
    + f'| RLMEC-like (shared prefix up to a random cut) | {times["rlmec_like"].rate_cells(bc.num_pairs)} |\n'
    + f'| unrelated (independent tokens) | {times["unrelated"].rate_cells(bc.num_pairs)} |\n\n'
    + f'Ratio (time of the unrelated pairs / the RLMEC-like pairs, per round): {ratio.text()}\n'
  )
  write_results(workdir, results, table)
  print(table)
  return results
