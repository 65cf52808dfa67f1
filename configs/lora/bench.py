"""Memory and speed of a LoRA training step vs a full fine-tuning step (experiments/bench_lora.py).

Sides: `full` (every parameter, float32), `lora` (rank-8 adapters on the attention projections and
the SwiGLU weights, float32 base) and `lora_bfloat16` (the same adapters on a bfloat16 base), each
the trainer's AdamW step on one synthetic batch, interleaved over 5 rounds after one warm-up call.
The parameter, optimizer-state, live-state and compiled step-footprint figures are deterministic; the
tokens/s are wall clock.

cpu (a 31.5M-parameter Llama-shaped model in float32, seq 256 x batch 4; 2 CPU cores shared with
other jobs, 1 min 45 s). Recorded 2026-12-07 (experiments/lora/README.md has the table): 655,360
trainable parameters (2.08%), optimizer state 240.1 -> 5.0 MiB, live train state 360.1 -> 127.5
MiB (67.5 with the bfloat16 base), compiled step footprint 1,024.8 -> 787.3 MiB, tokens/s 1.07x
(bfloat16 base 1.23x) of full fine-tuning's:
  python -m kuaijax.main --config=configs/lora/bench.py:cpu --workdir=/tmp/kj_bench_lora
default (one GPU; an 0.82B-parameter Llama-shaped model, bfloat16 compute, seq 2048 x batch 8;
not run yet):
  python -m kuaijax.main --config=configs/lora/bench.py --workdir=/tmp/kj_bench_lora_gpu
runlocal: a seconds-long smoke run (tests/experiments/bench_lora_test.py).
"""

import ml_collections

from kuaijax.config_lib import parse_arg, trainer_config
from kuaijax.models.lora import DEFAULT_TARGETS

CD = ml_collections.ConfigDict


def get_config(arg=None):
  args = parse_arg(arg, cpu=False, runlocal=False)
  if args.cpu and args.runlocal:
    raise ValueError(f'config arg {arg!r}: cpu and runlocal are alternatives; pick one')
  config = trainer_config(steps=1_000_000, batch_size=8, progress=False)
  config.experiment = 'bench_lora'
  config.data = CD(dict(seq_len=2048))
  config.model = CD(
    dict(
      vocab_size=32768,
      d_model=2048,
      num_layers=16,
      num_heads=16,
      num_kv_heads=8,
      d_ff=5632,
      dtype='bfloat16',
      param_dtype='float32',
      remat='dots',
    )
  )
  config.lora = CD(dict(rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, rslora=False))
  config.bench = CD(dict(rounds=5, warmup=1, steps_per_round=2, lora_base_dtypes=('bfloat16',)))
  if args.cpu:
    config.data.seq_len = 256
    config.train.batch_size = 4
    config.model.update(
      vocab_size=8192,
      d_model=512,
      num_layers=8,
      num_heads=8,
      num_kv_heads=8,
      d_ff=1536,
      dtype='float32',
      remat='none',
    )
    config.bench.steps_per_round = 1
  if args.runlocal:
    config.data.seq_len = 32
    config.train.batch_size = 2
    config.model.update(
      vocab_size=256,
      d_model=64,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      d_ff=128,
      dtype='float32',
      remat='none',
    )
    config.bench.update(rounds=2, steps_per_round=1)
  return config
