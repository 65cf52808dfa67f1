"""Hugging Face interop benchmark (experiments/bench_hf.py): import peak RSS / wall time of a ~1 GB
random Llama checkpoint vs just reading it with safetensors, and greedy decoding tokens/s of kuaijax
vs transformers at batch 1 and 8 (128 new tokens), side by side in one run. Needs the [hf] extra.

Timed through `kuaijax.benchmarking`: wall clock, `bench.warmup` untimed loads / decodes of each
side first, then `bench.rounds` rounds with the two sides in turn (import: one fresh process per
loader and round; decoding: torch given XLA's thread count); medians with min-max, ratios as the
median (min-max) of per-round ratios; results.md starts with the command and the thread counts.

CPU (any; the numbers in the HF section of experiments/hf/README.md come from this command):
  python -m kuaijax.main --config=configs/hf/bench.py --workdir=/tmp/kj_bench_hf
the import part only: add --config.bench.decode=False (or the `decode=false` argument).
runlocal (tiny sizes, 2 rounds; seconds; for tests):
  python -m kuaijax.main --config=configs/hf/bench.py:runlocal --workdir=/tmp/kj_bench_hf_local
Recorded (2 quiet CPU cores, 2026-12-07, 1 min 32 s wall): import 1.71x the plain safetensors read;
decoding 1.27x transformers at batch 1, 1.01x at batch 8 (experiments/hf/README.md).
"""

import ml_collections

from kuaijax.config_lib import parse_arg

LLAMA = dict(num_heads=16, num_kv_heads=8, tie_embeddings=False)


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, decode=True)
  config = ml_collections.ConfigDict()
  config.experiment = 'bench_hf'
  config.bench = ml_collections.ConfigDict(
    dict(
      # 12 x 16.8M + 2 x 32.8M = 267M float32 params: 1.0 GiB.
      import_model=dict(vocab_size=32000, d_model=1024, num_layers=12, d_ff=4096, **LLAMA),
      decode_model=dict(vocab_size=32000, d_model=512, num_layers=8, d_ff=1536, **LLAMA),
      batches=(1, 8),
      new_tokens=128,
      prompt_len=16,
      rounds=5,  # timed rounds, the two sides in turn in each
      warmup=1,  # untimed loads / decodes of each side first
      decode=args.decode,
    )
  )
  if args.runlocal:
    tiny = dict(vocab_size=256, d_model=64, num_layers=2, d_ff=128, num_heads=4, num_kv_heads=2)
    config.bench.update(
      import_model={**LLAMA, **tiny}, decode_model={**LLAMA, **tiny}, new_tokens=8, rounds=2
    )
  return config
