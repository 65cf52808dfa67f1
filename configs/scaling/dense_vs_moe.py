"""Scaling laws of dense vs Top-2 vs Top-P MoE decoders: L(N) and L(C) per family, equal compute.

Every family trains the same sizes on the same tokens; MoE layers have 8 (runlocal) / 16 (full)
experts of width d_model, dense layers a SwiGLU of width 2 d_model, so Top-2 activates the dense
FFN's parameters while holding four (eight) times as many. See experiments/scaling.py.

runlocal (3 families x 5 sizes, d_model 16..64, 2 layers, 120 steps of 8 x 128 tokens each; recorded
on 2 CPU cores shared with other jobs: 22 min of training + 18 s of fits; power laws fit every family
(R^2 0.96-0.99), Top-2 within 0.011 of dense at equal compute, Top-P 0.02-0.22 above; tables and
which claims hold in experiments/scaling/README.md):
  python -m kuaijax.main --config=configs/scaling/dense_vs_moe.py:runlocal --workdir=/tmp/kj_scaling
full scale (6 sizes, d_model 256..1536 and 4..24 layers, 10B tokens each on the paper's corpus; one
cluster job per cell with the same shared workdir, then one more call that only fits; not run here):
  for cell in dense_s1 ... topp_s6; do
    sbatch launch/slurm_gpu.sbatch  # with CONFIG=configs/scaling/dense_vs_moe.py WORKDIR=/shared/scaling
                                    # and the extra argument --config.cells=$cell
  done
  python -m kuaijax.main --config=configs/scaling/dense_vs_moe.py --workdir=/shared/scaling
"""

import os

import ml_collections

from kuaijax.config_lib import load_config, parse_arg

FAMILIES = 'dense,top2,topp'
RUNLOCAL_D = (16, 24, 32, 48, 64)
FULL_SIZES = ((256, 4), (384, 6), (512, 8), (768, 12), (1024, 16), (1536, 24))


def _size(d_model: int, num_layers: int, head_dim: int) -> dict:
  return dict(
    d_model=d_model,
    num_layers=num_layers,
    num_heads=d_model // head_dim,
    d_ff=2 * d_model,
    expert_d_ff=d_model,
  )


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  here = os.path.dirname(os.path.abspath(__file__))
  base_file = os.path.join(here, '..', 'topp_moe', 'compare.py')
  config = ml_collections.ConfigDict()
  config.experiment = 'scaling'
  config.families = FAMILIES
  config.cells = ''  # '' trains every cell; 'top2_s3,topp_s3' only those (same workdir)
  if args.runlocal:
    config.base = load_config(base_file + ':runlocal')
    sizes = [_size(d, 2, 8) for d in RUNLOCAL_D]
    config.base.moe_layer.num_experts = 8
    config.base.data.update(eval_batch_size=16, eval_batches=2)
    config.base.train.update(
      steps=120, batch_size=8, log_every=30, eval_every=30, checkpoint_every=120, progress=False
    )
    config.base.optimizer.update(warmup_steps=12)
  else:
    config.base = load_config(base_file)
    sizes = [_size(d, n, 64) for d, n in FULL_SIZES]
    # 10B tokens per cell: 4768 steps x 1024 x 2048.
    config.base.train.update(steps=4768, batch_size=1024, eval_every=596, checkpoint_every=596)
    config.base.optimizer.update(warmup_steps=400)
  config.sizes = ml_collections.ConfigDict({f's{i + 1}': s for i, s in enumerate(sizes)})
  return config
