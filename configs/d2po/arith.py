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

Args: `runlocal` (the posttrain runlocal policy), `repro` (the same policy, 4x the sampled
problems, 160 updates of 16 pairs, evaluated on the trained levels 1-2; 3 training seeds), `seeds=0+1+2`, `sft_from=<workdir>/seed_0/sft` (one finished SFT policy for every
training seed).
  python -m kuaijax.main --config=configs/d2po/arith.py:repro --workdir=/tmp/kj_d2po

First measurement (2026-12-07, `repro,seeds=0,sft_from=` the GRPO analysis probe's SFT policy, one
training seed, ± over 4 sampling seeds; 24 min 55 s on 2 CPU cores): the SFT policy samples 27.0 ±
2.5% on levels 1-2; its 768 x 4 samples give only 229 (correct, wrong) pairs, with equal mean lengths
(37.5 vs 37.8 tokens: no length bias to exploit on kj_arith). 160 steps of 16 pairs (11 epochs of
them) at lr 5e-5 over-fit: DPO 20.6 ± 1.9%, D2PO gamma 0.9 / 0.95 / 0.98 / 0.99 20.0 / 18.1 / 19.5
/ 20.1% (within the sampling spread of DPO), evaluation lengths 38.8-40.1 vs SFT 40.6. The setting
needs more pairs or fewer updates before the rows can be compared; not yet the 3-seed table.
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
