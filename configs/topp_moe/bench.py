"""Top-P MoE layer cost vs the experts it activates (experiments/bench_moe.py).

Cases: E=8 experts of width 1024, and fine-grained E=64 of width 128 with 2 shared experts
(DeepSeekMoE style); T=8192 tokens, d=512, float32, p=0.4, router scaled to ~2 experts per token.
CPU ('dropless' compiles one program per bucket: minutes of compilation):
  python -m kuaijax.main --config=configs/topp_moe/bench.py --workdir=/tmp/kj_bench_moe
GPU (bf16, the Pallas gmm; run by pallas_kernels/gpu_check.sh):
  python -m kuaijax.main --config=configs/topp_moe/bench.py:dtype=bfloat16 --workdir=$OUT/bench_moe
Seconds-long smoke run (tests):
  python -m kuaijax.main --config=configs/topp_moe/bench.py:runlocal --workdir=/tmp/kj_bench_moe_rl
Recorded (CPU, 2 cores shared, load ~15, 2026-11-30, 39 min wall): uncapped Top-P ('auto' =
'tiled') took 0.95x the dense SwiGLU of equal active FLOPs at E=8 and 1.57x at E=64; 0.79x and
0.50x the original loop over experts; 1.03x and 1.09x the k_max = ceil(max selected) time. E=64
re-measured with the router's partial sort (routing.FAST_HEAD), quiet machine: 1.43x the dense
layer, 0.45x the loop, 1.03x the capped time.
Results: results.json, results.md, cost_vs_mean_k.png (experiments/topp_moe/README.md).
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
      dispatches='dropless,dense',
      sweep_p=(0.1, 0.2, 0.3, 0.4, 0.6, 0.8),
      gmm_implementation='auto',
      clock='auto',  # 'auto': process CPU time on CPU, wall time on GPU/TPU; or 'cpu' | 'wall'
      dtype=args.dtype,
      rounds=3,
      seed=0,
    )
  )
  if args.runlocal:
    config.bench.update(tokens=256, d_model=32, rounds=1, sweep_p=(0.2, 0.6))
    config.bench.cases.e8.update(d_ff=64)
    config.bench.cases.e64.update(num_experts=16, d_ff=16)
  return config
