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
evaluation, the multi-run fractions of problems solved in any sampling run (pass@4) and in some but
not all ("uncertain"); during training the fraction of groups whose advantages are all zero, the
injected fraction and the completion length; then every row's accuracy minus `grpo_all`'s on the
same training seed (`config.reference_row`).

Args: `runlocal` (the posttrain runlocal policy: 0.84M parameters, byte tokens), `repro` (the same
policy, SFT trained once (seed 0) and post-trained by 3 training seeds; every GRPO row 40 steps of
16 prompts x 8 samples at lr 2e-4), `gpu` (the same SFT policy; 120 steps of 32 prompts x 8 per
row, sized for ~10 minutes on one H100; never run on a device yet), `stages=` rows (`sft` is
added), `seeds=0+1+2`, `sft_from=<workdir>/shared/sft` (import a finished SFT policy),
`sft_per_seed=True` (one SFT policy per training seed instead of a shared one).
  python -m kuaijax.main --config=configs/grpo/analysis.py:repro --workdir=/tmp/kj_grpo_analysis
  python -m kuaijax.main --config=configs/grpo/analysis.py:gpu --workdir=/tmp/kj_grpo_analysis_gpu

Headroom, measured on the baseline alone before any comparison (2026-12-07): the SFT policy samples
27.0 ± 2.5% on the trained levels (level 1 44.8%, level 2 9.2%; ± over 4 sampling seeds), greedy
29.5%; 46.0% of the problems are solved in some run, 32.5% in some but not all: inside the 20-80%
range. The GRPO learning rate was chosen on grpo_all alone: 60 steps at 1e-4 moved nothing (28.0%).

repro measured 2026-12-07 on 2 CPU cores (46 min 32 s wall, part of it next to short test runs;
stage times: SFT 479 s, each GRPO row 135-163 s with its evaluation), ± over 3 training seeds:
grpo_all 27.5 ± 0.8%; minus grpo_all on the same seed: negative-only -7.1 ± 2.0 points (lower on 3
of 3 seeds), positive-only -3.0 ± 0.4 (3 of 3), length reward -0.3 ± 0.7, offline injection +1.0 ±
1.0. GRPO sharpens rather than improves at this budget: solved-in-any-run falls from 46.0% to 39.8
± 1.0 (all samples) and 31.7 ± 1.8 (negative-only), the uncertain fraction from 32.5% to ~20%;
only injection keeps pass@4 (44.8 ± 1.0) while it turns 62% zero-advantage groups into 9%.
experiments/arith/README.md has the table and what it shows.
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
