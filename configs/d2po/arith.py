"""D2PO vs DPO on kj_arith (arXiv 2502.14340, "earlier tokens contribute more"): a gamma sweep of the
temporally decayed DPO against sigmoid DPO on the same pairs, with the length bias measured.

Stages (the pipeline of configs/arith/posttrain.py, per training seed in `<workdir>/seed_<s>/`):
`sft` -> `samples` (the SFT policy's own samples of training problems) -> `pairs` ((correct, wrong)
pairs of the same problem; the stage summary reports the mean chosen and rejected lengths and how
often the chosen side is longer) -> `dpo` (sigmoid, beta 0.1) and one `d2po_g<gamma>` stage per
gamma of `GAMMAS` (D2PO weights completion token t by gamma^t, so gamma = 1 is DPO), every one from
the SFT policy on the same pairs with the same steps, batch and optimizer.

The table (experiments/arith_posttrain.py): held-out accuracy per level, greedy accuracy, mean
completion length at evaluation (the length bias: DPO-family training lengthens or shortens the
policy's answers), the multi-run uncertain fraction, every row's accuracy minus DPO's on the same
training seed (`config.reference_row`), and the pairs' length statistics in the stage table.

Args: `runlocal` (the posttrain runlocal policy), `repro` (the same policy, SFT trained once (seed
0) and post-trained by 3 training seeds; 3000 sampled problems x 4 samples per seed, ~870 pairs seen
about once: 60 updates of 16 pairs at lr 5e-5; evaluated on the trained levels 1-2), `gpu` (the same
SFT policy; 10000 problems, 200 updates; sized for ~10 minutes on one H100, never run on a device
yet), `seeds=0+1+2`, `sft_from=<workdir>/shared/sft` (import a finished SFT policy),
`sft_per_seed=True` (one SFT policy per training seed).
  python -m kuaijax.main --config=configs/d2po/arith.py:repro --workdir=/tmp/kj_d2po

Sizing (chosen on DPO alone, one seed): 229 pairs for 11 epochs over-fit DPO to 20.6% from SFT's
27.0%; the same pairs for one epoch (15 updates) left it at 26.9% with a loss still at ln 2.

repro measured 2026-12-07 on 2 CPU cores: 39 min 44 s wall with the SFT stage copied from the GRPO
analysis run (the same block; trained there in 479 s, so ~48 min from scratch), ± over 3 training
seeds: DPO 27.6 ± 0.9%, D2PO gamma 0.9 / 0.95 / 0.98 / 0.99 27.4 ± 1.4 / 27.3 ± 1.4 / 28.3 ± 0.8 /
28.4 ± 0.7%; paired minus DPO -0.2 ± 2.3 / -0.3 ± 2.0 / +0.7 ± 1.3 / +0.8 ± 1.3 points: no row
separates. No length bias to remove: chosen and rejected are 37.5 and 37.7 tokens, evaluation
lengths 40.6-40.7 for every row. Measured cause of gamma's small effect: a correct and a wrong
solution of the same problem share their first 18 tokens (median), where the log-ratios cancel, so
gamma^t only scales the differing tokens down (0.15 at gamma 0.9): D2PO 0.9 ends with 3-8x smaller
reward margins than DPO. experiments/arith/README.md has the table and what it shows.
"""

import ml_collections

from configs.arith import posttrain
from kuaijax.config_lib import parse_arg, stage_steps

GAMMAS = (0.9, 0.95, 0.98, 0.99)


def row_name(gamma: float) -> str:
  """'d2po_g098' for gamma 0.98."""
  return f'd2po_g{round(gamma * 100):03d}'


def get_config(arg=None):
  args = parse_arg(
    arg, runlocal=False, repro=False, gpu=False, seeds='', sft_from='', sft_per_seed=False
  )
  config = posttrain.comparison_config(arg, args, reference_row='dpo')
  stage = config.stage
  dpo = stage.dpo
  if args.repro or args.gpu:  # the pairs seen about once, evaluated on the trained levels
    # repro ~900 pairs (2 CPU cores); gpu ~3000 (one H100, ~10 minutes for the table)
    stage.samples.update(limit=10_000 if args.gpu else 3000, num_samples=4)
    dpo.train.update(stage_steps(200 if args.gpu else 60, 16))
    posttrain.trained_levels_eval(config)
  rows = {}
  for gamma in GAMMAS:  # the same steps, batch, optimizer and beta as DPO
    block = posttrain.dpo_stage('d2po')
    block.label = f'D2PO, gamma {gamma}'
    block.train = ml_collections.ConfigDict(dpo.train.to_dict())
    block.optimizer = ml_collections.ConfigDict(dpo.optimizer.to_dict())
    block.loss.update(beta=dpo.loss.beta, gamma=gamma)
    rows[row_name(gamma)] = block
  config.stage = ml_collections.ConfigDict(
    {name: stage[name] for name in ('sft', 'samples', 'pairs', 'dpo')} | rows
  )
  config.stages = ','.join(['sft', 'samples', 'pairs', 'dpo', *rows])
  return config
