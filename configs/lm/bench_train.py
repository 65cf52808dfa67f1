"""Training throughput of the decoder LM vs transformers, side by side (experiments/bench_train.py).

CPU (2 cores, d_model 512, 4 layers, seq 512, batch 8, float32, AdamW; 1 min 14 s quiet): kuaijax's
trainer step and a transformers Llama of the same shape with torch AdamW, interleaved over 5 rounds,
plus a 2048^3 matmul for the utilisation. Recorded 2026-12-07: 2,078 vs 2,759 tokens/s, 0.75x
(README.md says why: the matmul library):
  python -m kuaijax.main --config=configs/lm/bench_train.py --workdir=/tmp/kj_bench_train
GPU/TPU, bf16 at larger width (kuaijax only; not recorded):
  python -m kuaijax.main --config=configs/lm/bench_train.py:accelerator --workdir=/tmp/kj_bench_train
"""

import ml_collections

from kuaijax.config_lib import parse_arg, trainer_config


def get_config(arg=None):
  args = parse_arg(arg, accelerator=False, runlocal=False)
  config = trainer_config(steps=1_000_000, batch_size=8, progress=False)
  config.experiment = 'bench_train'
  config.data = ml_collections.ConfigDict(dict(seq_len=512))
  config.model = ml_collections.ConfigDict(
    dict(
      vocab_size=384,
      d_model=512,
      num_layers=4,
      num_heads=8,
      num_kv_heads=8,
      d_ff=1536,
      dtype='float32',
      param_dtype='float32',
      remat='none',
    )
  )
  config.bench = ml_collections.ConfigDict(
    dict(matmul_size=2048, rounds=5, warmup=1, steps_per_round=3, transformers=True)
  )
  if args.accelerator:
    config.data.seq_len = 2048
    config.model.update(
      d_model=2048,
      num_layers=8,
      num_heads=16,
      num_kv_heads=8,
      d_ff=5632,
      vocab_size=32768,
      dtype='bfloat16',
      remat='dots',
    )
    config.train.batch_size = 16
    config.bench.update(matmul_size=8192, transformers=False)
  if args.runlocal:  # a seconds-long smoke run for tests
    config.model.update(d_model=64, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=128)
    config.data.seq_len = 64
    config.train.batch_size = 2
    config.bench.update(matmul_size=256, rounds=2, steps_per_round=1)
  return config
