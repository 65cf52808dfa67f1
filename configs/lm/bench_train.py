"""Training throughput / utilisation benchmark of the decoder LM (synthetic tokens).

CPU (2 cores, ~3 minutes; reports utilisation vs a 2048^3 matmul in the same process; recorded
run: about 2,200 training tokens/s, 52-53% of the matmul's FLOP/s, see README.md):
  python -m kuaijax.main --config=configs/lm/bench_train.py --workdir=/tmp/kj_bench_train
GPU/TPU, bf16 at larger width (not recorded):
  python -m kuaijax.main --config=configs/lm/bench_train.py:accelerator --workdir=/tmp/kj_bench_train
"""

import ml_collections

from kuaijax.config_lib import parse_arg, trainer_config


def get_config(arg=None):
  args = parse_arg(arg, accelerator=False, runlocal=False)
  config = trainer_config(
    steps=24,
    batch_size=8,
    log_every=4,
    eval_every=1_000_000,
    checkpoint_every=1_000_000,
    keep_checkpoints=1,
    progress=False,
  )
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
  config.bench = ml_collections.ConfigDict(dict(matmul_size=2048))
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
    config.train.update(batch_size=16, steps=40, log_every=5)
    config.bench.matmul_size = 8192
  if args.runlocal:  # a seconds-long smoke run for tests
    config.model.update(d_model=64, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=128)
    config.data.seq_len = 64
    config.train.update(steps=6, batch_size=2, log_every=2)
    config.bench.matmul_size = 256
  return config
