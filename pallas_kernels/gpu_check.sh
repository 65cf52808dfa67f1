#!/usr/bin/env bash
# GPU check of the Pallas kernels and the MoE layer, bounded to ~7 minutes on one GPU.
#
#   OUT=/path/to/reports bash pallas_kernels/gpu_check.sh      # from the repository root
#
# Needs jax[cuda], flax, optax, orbax, chex and pytest. The kernel tests and kernel benchmarks need
# nothing else; the MoE layer benchmark also needs absl, ml_collections and matplotlib and is skipped
# (said so in the log) without them. grain / tfds are never imported.
# Writes at most 8 files into $OUT: gpu_check.log (every step, its exit code and test summary),
# gmm_bench.{md,json}, topp_router.{md,json}, token_logprobs.{md,json} and bench_moe.md (the MoE
# layer vs the dense SwiGLU of equal active FLOPs and vs the original loop over experts).
# Each step has its own time limit, so a slow or failing step does not stop the others.
set -u
OUT=${OUT:-/tmp/kuaijax_gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export JAX_PLATFORMS=cuda
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, not an installed copy
: > "$LOG"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" >> "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >> "$LOG" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start))s" >> "$LOG"
}

python -c "import jax; print('jax', jax.__version__, jax.devices())" >> "$LOG" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1

# 1. Kernel tests on the GPU (the gpu-marked tests run here; TPU ones skip).
step kernel_tests 110 python -m pytest tests/pallas_kernels -q -p no:cacheprovider
# 2. gmm vs dense matmul of equal FLOPs (and ragged_dot), MoE shape (m=16384, k=512, n=1024, G=8).
step gmm_bench 60 python -m pallas_kernels.gmm.bench --out "$OUT" --shapes moe \
  --dtypes bfloat16,float32 --rounds 10
# 3. Fused Top-P router vs the unfused routing.
step topp_router_bench 30 python -m pallas_kernels.topp_router.bench --out "$OUT" \
  --tokens 8192 --d 512 --experts 8,64 --dtype bfloat16
# 4. Fused token log-probs vs the unfused path.
step token_logprobs_bench 30 python -m pallas_kernels.token_logprobs.bench --out "$OUT" \
  --tokens 4096 --d 512 --vocab 32768 --dtype bfloat16
# 5. The MoE layer (bf16, 'auto' = bucketed dropless with the Pallas gmm) vs dense of equal FLOPs,
#    one case per run so a slow compile loses one case only.
if python -c "import absl, ml_collections, matplotlib" >> "$LOG" 2>&1; then
  MOE_TMP=$(mktemp -d)
  for CASE in e8 e64; do
    step "bench_moe_$CASE" 85 python -m kuaijax.main \
      --config=configs/topp_moe/bench.py:dtype=bfloat16 --workdir="$MOE_TMP/$CASE" \
      --config.bench.run_cases=$CASE --config.bench.dispatches=dense \
      --config.bench.sweep_p='(0.2, 0.4, 0.8)' --config.bench.rounds=5
    if [ -f "$MOE_TMP/$CASE/results.md" ]; then
      cat "$MOE_TMP/$CASE/results.md" >> "$OUT/bench_moe.md"
      echo >> "$OUT/bench_moe.md"
    fi
  done
  rm -rf "$MOE_TMP"
else
  echo "=== bench_moe skipped: absl / ml_collections / matplotlib missing" >> "$LOG"
fi
echo "=== done" >> "$LOG"
