"""Paths/s of k=20 reasoning paths in one batched generate call vs 20 single calls.

experiments/bench_paths.py: the two sides (one `aggregate.sample_paths(k=20)` call; 20 calls with
k=1) are timed through `kuaijax.benchmarking` (wall clock, `bench.warmup` untimed calls of each
first, then `bench.rounds` interleaved rounds); results.md starts with the command and the thread
count and gives paths/s (median, min-max) and the per-round time ratio single / batched as
median (min-max).

CPU (the runlocal model size of configs/self_agreement/toy.py, random weights; 2 quiet cores,
2026-12-07, 24 s wall: 141 vs 91 paths/s, the batched call 1.55x faster; experiments/self_agreement/README.md):
  python -m kuaijax.main --config=configs/self_agreement/bench.py --workdir=/tmp/kj_bench_paths
Seconds-long smoke run (tests):
  python -m kuaijax.main --config=configs/self_agreement/bench.py:runlocal --workdir=/tmp/kj_bench_paths_rl
"""

import ml_collections

from kuaijax.config_lib import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.experiment = 'bench_paths'
  config.model = ml_collections.ConfigDict(
    dict(vocab_size=259, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384)
  )
  config.bench = ml_collections.ConfigDict(
    dict(k=20, questions=8, max_new_tokens=64, prompt_len=128, rounds=5, warmup=1)
  )
  if args.runlocal:
    config.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
    config.bench.update(k=3, questions=2, max_new_tokens=4, prompt_len=64)
  return config
