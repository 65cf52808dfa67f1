"""Pairs/s of RLMEC's imitation weights (`kuaijax.data.edits.imitation_weights_batch`).

experiments/bench_edits.py times one batched call over RLMEC-like pairs (the rewrite keeps the
sample up to a random cut) and one over unrelated pairs through `kuaijax.benchmarking`: wall clock,
`bench.warmup` untimed calls of each first (compilation), then `bench.rounds` interleaved rounds;
results.md starts with the command and the thread count and gives pairs/s (median, min-max) and the
per-round time ratio unrelated / RLMEC-like as median (min-max). The alignment runs on the host
CPU whatever the default backend.

Host CPU (2048 pairs of 512 tokens; 8 s wall on 2 quiet cores, 2026-12-07: 7,405 RLMEC-like and
4,440 unrelated pairs/s, ratio 1.65x; experiments/rlmec/README.md):
  python -m kuaijax.main --config=configs/rlmec/bench_edits.py --workdir=/tmp/kj_bench_edits
Seconds-long smoke run (tests):
  python -m kuaijax.main --config=configs/rlmec/bench_edits.py:runlocal --workdir=/tmp/kj_bench_edits_rl
"""

import ml_collections

from kuaijax.config_lib import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.experiment = 'bench_edits'
  config.bench = ml_collections.ConfigDict(
    dict(
      num_pairs=2048,
      length=512,  # tokens per sample and per rewrite
      vocab=64,  # token ids below this
      seed=0,
      rounds=5,  # timed rounds, each side once per round, in turn
      warmup=1,  # untimed calls of each side first (compilation)
    )
  )
  if args.runlocal:
    config.bench.update(num_pairs=64, length=64)
  return config
