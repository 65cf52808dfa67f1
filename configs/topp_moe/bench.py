"""MoE FFN dispatch benchmark: fwd+bwd time over a dense SwiGLU with the same active FLOPs.

CPU (E=8, d=512, f=1024, 8192 tokens, float32; 6 min wall on 2 CPU cores in the recorded run):
  python -m kuaijax.main --config=configs/topp_moe/bench.py --workdir=/tmp/kj_bench_moe
Seconds-long smoke run (tests):
  python -m kuaijax.main --config=configs/topp_moe/bench.py:runlocal --workdir=/tmp/kj_bench_moe_rl
Goal: the 'auto' strategy <= 1.5x the dense-equivalent on CPU (<= 1.3x on a GPU). Recorded (CPU,
experiments/topp_moe/README.md): 'auto' at 0.91x (Top-2) and 0.85x (Top-P); GPU not recorded.
Results: results.json, results.md and times.png in the workdir.
"""

import ml_collections

from kuaijax.config_lib import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, dtype='float32')
  config = ml_collections.ConfigDict()
  config.experiment = 'bench_moe'
  config.bench = ml_collections.ConfigDict(
    dict(
      tokens=8192,
      d_model=512,
      d_ff=1024,
      num_experts=8,
      k=2,
      p=0.4,
      k_max=4,
      target_mean_k=2.0,
      capacity_factor=1.25,
      dtype=args.dtype,
      rounds=5,
      seed=0,
    )
  )
  if args.runlocal:
    config.bench.update(tokens=256, d_model=32, d_ff=64, rounds=2)
  return config
