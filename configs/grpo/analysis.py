"""The GRPO analysis table on kj_arith ("Dissecting Long Reasoning Models", arXiv 2506.04913): which
samples GRPO learns from, the relative length reward and offline injection, one change per row.

Stages (the pipeline of configs/arith/posttrain.py, per training seed in `<workdir>/seed_<s>/`):
`sft` (the starting policy, trained on levels 1-2), then one online GRPO stage per row, each from
that SFT policy with the same prompts, group size, steps and optimizer:

| row | what differs from `grpo_all` |
|---|---|
| `grpo_all` | nothing: every sample of a group, exact-answer reward |
| `grpo_negative` | negative-only: the correct samples are masked out of the loss |
| `grpo_positive` | positive-only: the wrong samples are masked out |
| `grpo_length` | the relative length reward (shorter correct answers in a group get a bonus) |
| `grpo_injection` | offline injection: a gold solution replaces one wrong sample of a group that is almost all wrong |

The tables (experiments/arith_posttrain.py, the post-training experiment): held-out accuracy per
trained level (sampled, mean ± std over training seeds), greedy accuracy, mean completion length at
evaluation, the multi-run fraction of problems solved in some but not all sampling runs
("uncertain"); during training the fraction of groups whose advantages are all zero, the injected
fraction and the completion length; then every row's accuracy minus `grpo_all`'s on the same
training seed (`config.reference_row`).

Args: `runlocal` (the posttrain runlocal policy: 0.84M parameters, byte tokens), `repro` (the same
policy; every GRPO row 60 steps of 16 prompts x 8 samples; 3 training seeds), `stages=` rows (`sft`
is added), `seeds=0+1+2`, `sft_from=<workdir>/seed_0/sft` (one finished SFT policy shared by every
training seed, imported once: the seeds then vary the GRPO runs only).
  python -m kuaijax.main --config=configs/grpo/analysis.py:repro --workdir=/tmp/kj_grpo_analysis

Headroom, measured on the baseline before any comparison (2026-12-07, seed 0, `repro,seeds=0,
stages=grpo_all`, 2 CPU cores shared with two other jobs: SFT 723 s, grpo_all 565 s): the SFT
policy's sampled accuracy on the trained levels is 27.0 ± 2.5% (level 1 44.8%, level 2 9.2%; ± over 4
sampling seeds), greedy 29.5%, and 32.5% of the problems are solved in some but not all of the 4
runs: inside the 20-80% range, with room to improve and something to keep. grpo_all after 60 steps:
29.0 ± 1.5% (+2.0 points, within the sampling spread), with 59% of its groups all right or all wrong
(zero advantage). The full 3-seed table has not been run yet: at ~5 s per GRPO step on a quiet
machine its 15 GRPO runs take longer than the 45-minute budget, so the step count is still to be
sized (`sft_from=` already saves the three SFT runs).
"""

import ml_collections

from configs.arith import posttrain
from kuaijax.config_lib import parse_arg, stage_steps

CD = ml_collections.ConfigDict
# (steps, prompts per step) of every GRPO row, 8 samples per prompt: `repro` (2 CPU cores) and
# `gpu` (one H100, ~10 minutes for the table: 6x the rollouts per row).
REPRO_STEPS = (40, 16)
GPU_STEPS = (120, 32)

# Row -> the GRPO options that differ from the reference row, grpo_all.
VARIANTS = {
  'grpo_all': {},
  'grpo_negative': dict(sample_filter='negative_only'),
  'grpo_positive': dict(sample_filter='positive_only'),
  'grpo_length': dict(reward='relative_length'),
  'grpo_injection': dict(offline_injection=True),
}
LABELS = {
  'grpo_all': 'GRPO, all samples',
  'grpo_negative': 'GRPO, negative-only',
  'grpo_positive': 'GRPO, positive-only',
  'grpo_length': 'GRPO + relative length reward',
  'grpo_injection': 'GRPO + offline injection',
}


def get_config(arg=None):
  args = parse_arg(
    arg,
    runlocal=False,
    repro=False,
    gpu=False,
    stages='',
    seeds='',
    sft_from='',
    sft_per_seed=False,
  )
  config = posttrain.comparison_config(arg, args, reference_row='grpo_all')
  small = args.runlocal or args.repro or args.gpu
  rows = [r for r in args.stages.replace('+', ',').split(',') if r] or list(VARIANTS)
  unknown = sorted(set(rows) - set(VARIANTS) - {'sft'})
  if unknown:
    raise ValueError(f'stages={args.stages!r}: unknown rows {unknown}; rows: {list(VARIANTS)}')
  stage = CD(dict(sft=config.stage.sft))
  for name, change in VARIANTS.items():
    block = posttrain.grpo_stage(change.get('reward', 'exact_answer'))
    block.label = LABELS[name]
    block.options.update({k: v for k, v in change.items() if k != 'reward'})
    if args.repro or args.gpu:
      block.train.update(stage_steps(*(GPU_STEPS if args.gpu else REPRO_STEPS)))
      block.optimizer.update(lr=2e-4, warmup_steps=2)
    elif small:
      block.train.update(stage_steps(20, 8))
      block.optimizer.update(lr=2e-5, warmup_steps=2)
    stage[name] = block
  config.stage = stage
  config.stages = ','.join(['sft'] + [r for r in rows if r != 'sft'])
  if small:
    posttrain.trained_levels_eval(config)
  return config
