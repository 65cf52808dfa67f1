"""Top-P MoE layer cost in wall clock vs the original PyTorch loop and a dense layer (experiments/bench_moe.py).

Cases: E=8 experts of width 1024, and fine-grained E=64 of width 128 with 2 shared experts
(DeepSeekMoE style); T=8192 tokens, d=512, float32, p=0.4, router scaled to ~2 experts per token,
uncapped; fwd+bwd, wall clock, 5 interleaved rounds, torch and XLA on the same threads.
CPU (~10 minutes, mostly compilation of the 'dropless' buckets):
  python -m kuaijax.main --config=configs/topp_moe/bench.py --workdir=/tmp/kj_bench_moe
GPU (bf16, the Pallas gmm; run by pallas_kernels/gpu_check.sh; no torch side):
  python -m kuaijax.main --config=configs/topp_moe/bench.py:dtype=bfloat16 --workdir=$OUT/bench_moe
Seconds-long smoke run (tests):
  python -m kuaijax.main --config=configs/topp_moe/bench.py:runlocal --workdir=/tmp/kj_bench_moe_rl
Recorded figures: experiments/topp_moe/README.md ("MoE layer cost").
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
      p=0.4,
      cases=dict(
        e8=dict(num_experts=8, d_ff=1024, num_shared_experts=0, target_mean_k=2.0),
        e64=dict(num_experts=64, d_ff=128, num_shared_experts=2, target_mean_k=2.0),
      ),
      run_cases='e8,e64',
      # Extra uncapped strategies next to 'auto' ('dense' = every expert on every token).
      dispatches='dropless',
      sweep_p=(0.2, 0.4, 0.6),
      gmm_implementation='auto',
      dtype=args.dtype,
      torch=args.dtype == 'float32',  # the original PyTorch loop as a side (CPU, float32)
      rounds=5,
      warmup=1,
      seed=0,
    )
  )
  if args.runlocal:
    config.bench.update(tokens=256, d_model=32, rounds=2, sweep_p=(0.2, 0.6))
    config.bench.cases.e8.update(d_ff=64)
    config.bench.cases.e64.update(num_experts=16, d_ff=16)
  return config
