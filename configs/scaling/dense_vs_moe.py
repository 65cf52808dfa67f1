"""Scaling laws of dense vs Top-2 vs Top-P MoE decoders: L(N) and L(C) per family, equal compute.

One pipeline (`kuaijax.stages`): every cell (family x size) is a model role `config.models.<cell>`
and a 'pretrain' stage `config.stage.<cell>` (cells 'dense_s1' .. 'topp_s5'), on the Top-P MoE
paper's data, optimizer and evaluators (`configs.topp_moe.compare.moe_lm`, shared with
configs/topp_moe/compare.py). Every family trains the same sizes on the same tokens; MoE layers have
8 (runlocal) / 16 (full) experts of width d_model, dense layers a SwiGLU of width 2 d_model, so Top-2
activates the dense FFN's parameters while holding four (eight) times as many. Args: `cells=` picks
the cells this call trains ('top2_s3+topp_s3'; default all), `seeds=0+1+2` the training seeds
(default 0; 0+1+2 for repro / gpu), `repro` / `gpu` the reproduction settings below. See
experiments/scaling.py.

runlocal (3 families x 5 sizes, d_model 16..64, 2 layers, 120 steps of 8 x 128 tokens each; recorded
with one training seed on 2 CPU cores shared with other jobs (load average 12-15): 22 min of
training + 18 s of fits; power laws fit every family (R^2 0.96-0.99), Top-2 within 0.011 of dense
at equal compute, Top-P 0.02-0.22 above; tables and which claims hold in
experiments/scaling/README.md):
  python -m kuaijax.main --config=configs/scaling/dense_vs_moe.py:runlocal --workdir=/tmp/kj_scaling
repro (the runlocal grid trained 800 steps x 16 x 128 = 1.64M tokens per cell, 20 tokens per
activated parameter of the largest dense cell, 3 training seeds; measured 2026-12-07 on 2 CPU cores:
29 min 37 s wall; at equal compute Top-2 is 0.05-0.08 and Top-P 0.04-0.07 below dense, 3 of 3 seeds,
95% intervals excluding 0; experiments/scaling/README.md):
  python -m kuaijax.main --config=configs/scaling/dense_vs_moe.py:repro --workdir=/tmp/kj_scaling_repro
gpu (d_model 32..128, 600 steps x 64 x 256 = 9.8M tokens per cell, 3 seeds; sized for ~10 minutes on
one H100, not yet run on a device):
  python -m kuaijax.main --config=configs/scaling/dense_vs_moe.py:gpu --workdir=/tmp/kj_scaling_gpu
full scale (6 sizes, d_model 256..1536 and 4..24 layers, 10B tokens each on the paper's corpus; one
cluster job per cell with the same shared workdir, then one more call that finds every cell finished
and only fits; not run here; the SentencePiece tokenizer is trained once into <workdir>/shared/, so
train one cell first or set data.spm_model_path):
  for cell in dense_s1 ... topp_s6; do
    sbatch launch/slurm_gpu.sbatch  # with CONFIG=configs/scaling/dense_vs_moe.py:cells=$cell
  done                              # and WORKDIR=/shared/scaling
  python -m kuaijax.main --config=configs/scaling/dense_vs_moe.py --workdir=/shared/scaling
"""

import ml_collections

from configs.topp_moe import compare
from kuaijax.config_lib import (
  moe_aux_loss,
  moe_model,
  moe_routings,
  parse_arg,
  parse_seeds,
  pretrain_stage,
)

FAMILIES = ('dense', 'top2', 'topp')
RUNLOCAL_D = (16, 24, 32, 48, 64)
GPU_D = (32, 48, 64, 96, 128)
FULL_SIZES = ((256, 4), (384, 6), (512, 8), (768, 12), (1024, 16), (1536, 24))


def _size(d_model: int, num_layers: int, head_dim: int) -> dict:
  """The model overrides of one size (MoE experts as wide as d_model, dense FFN 2 d_model)."""
  heads = d_model // head_dim
  return dict(
    d_model=d_model, num_layers=num_layers, num_heads=heads, num_kv_heads=heads, d_ff=2 * d_model
  )


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, repro=False, gpu=False, cells='', seeds='')
  if args.runlocal + args.repro + args.gpu > 1:
    raise ValueError(f'config arg {arg!r}: runlocal, repro and gpu are alternatives; pick one')
  reproduction = args.repro or args.gpu
  config, model, moe_layer = compare.moe_lm(args.runlocal or reproduction)
  config.experiment = 'scaling'
  config.seeds = parse_seeds(args.seeds or ('0+1+2' if reproduction else '0'))
  if args.runlocal or reproduction:
    sizes = [_size(d, 2, 8) for d in (GPU_D if args.gpu else RUNLOCAL_D)]
    moe_layer.update(num_experts=8)
    config.data.update(eval_batch_size=16, eval_batches=2)
    config.train.update(
      steps=120, batch_size=8, log_every=30, eval_every=30, checkpoint_every=120, progress=False
    )
    config.optimizer.update(warmup_steps=12)
  else:
    sizes = [_size(d, n, 64) for d, n in FULL_SIZES]
    # 10B tokens per cell: 4768 steps x 1024 x 2048.
    config.train.update(steps=4768, batch_size=1024, eval_every=596, checkpoint_every=596)
    config.optimizer.update(warmup_steps=400)
  if reproduction:
    # Every cell trained to >= 20 tokens per activated non-embedding parameter of the largest dense
    # model (1.64M tokens on CPU, 9.8M on one H100), evaluated 8 times for the compute frontier.
    steps = 600 if args.gpu else 800
    config.data.update(seq_len=256 if args.gpu else 128, eval_batch_size=32, eval_batches=4)
    config.train.update(
      steps=steps,
      batch_size=64 if args.gpu else 16,
      eval_every=steps // 8,
      log_every=steps // 8,
      checkpoint_every=steps // 2,
    )
    config.optimizer.update(warmup_steps=50)
  routing = moe_routings()
  models, stages = {}, {}
  for family in FAMILIES:
    for i, size in enumerate(sizes):
      cell, layer = f'{family}_s{i + 1}', {**moe_layer, 'expert_d_ff': size['d_model']}
      models[cell] = moe_model({**model, **size}, routing[family], layer, name=f'cell {cell}')
      stages[cell] = pretrain_stage(cell, aux_loss=moe_aux_loss(), family=family, size=f's{i + 1}')
  config.models = ml_collections.ConfigDict(models)
  config.stage = ml_collections.ConfigDict(stages)
  # The cells this call trains; the fits wait until every cell of the grid has finished.
  config.stages = args.cells.replace('+', ',') or ','.join(stages)
  return config
