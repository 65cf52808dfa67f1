"""kj_arith post-training on the stage pipeline: SFT, then DPO / RFT / RLMEC on the SFT policy's own
samples and online GRPO.

Table: held-out accuracy by difficulty level per trained policy, sampled once per sampling seed of
`evals.arith.seeds` plus greedy; with one training seed (the default) the ± is the std over those
sampling seeds of one trained policy, with `seeds=0+1+2` the std over training seeds
(experiments/arith/README.md has our numbers).

runlocal (0.84M-parameter byte-level policy trained on levels 1-2, evaluated on levels 1-3; both
recorded runs: one training run, ± over 3 sampling seeds). Recorded before the stage pipeline (same
hyper-parameters, stages sft+dpo+grpo): 15 min 50 s wall on 2 CPU cores shared with other jobs
(load 4-10); SFT ~43% on level 1, ~6% on level 2, DPO and GRPO at SFT's means on levels 1-2 (DPO one
more level-3 problem of 40). On the pipeline with `stages=sft+dpo+rft+rlmec+grpo` (2026-11-30, load
14-24, SFT 52 min wall, 64 min in all): SFT 47.5% level 1 / 8.3% level 2, DPO, RFT, RLMEC and GRPO
each within one sampling-seed std of it; tables in experiments/arith/README.md.
  python -m kuaijax.main --config=configs/arith/posttrain.py:runlocal --workdir=workdirs/arith_posttrain
full scale (one GPU or TPU host; ~76M parameters, levels 1-4; not run yet):
  python -m kuaijax.main --config=configs/arith/posttrain.py --workdir=gs://.../arith_posttrain
Args: `stages=sft+dpo+rft+rlmec+grpo` picks the rows (the sampling stages they need are added);
`dpo_loss=ipo` (a `kuaijax.losses.preference.DPO_LOSS_TYPES` name, or capo / d2po) and
`reward=relative_length` pick the objectives; `sft_from=<workdir>/sft` starts from an existing SFT
run instead of training one; `seeds=0+1+2` the training seeds:
  ... --config=configs/arith/posttrain.py:runlocal,stages=grpo,sft_from=workdirs/arith_posttrain/sft
`lora=True` adds two rows post-trained from the SFT policy at the same steps x batch as RFT:
`sft_more` (SFT continued, every parameter) and `sft_lora` (SFT continued with LoRA adapters,
model role `policy_lora`, merged into the policy at the end); the LoRA learning rate is 10x the
full one, as is customary for LoRA:
  ... --config=configs/arith/posttrain.py:runlocal,stages=sft,lora=True
"""

import ml_collections

from kuaijax.config_lib import (
  data_section,
  lm_model,
  parse_arg,
  parse_seeds,
  stage_steps,
  trainer_config,
)
from kuaijax.config_lib import train_stage as _train
from kuaijax.losses.preference import DPO_LOSS_TYPES
from kuaijax.models.lora import DEFAULT_TARGETS

CD = ml_collections.ConfigDict
LORA_ROLE = 'policy_lora'
LORA_LR_FACTOR = 10.0  # LoRA learning rate / full fine-tuning's (the customary ~10x)


def arith_data(**overrides) -> CD:
  """The kj_arith data section (levels 1-4, byte tokens); `overrides` change any field."""
  fields = dict(
    task='kj_arith',
    tokenizer='byte',
    levels=(1, 2, 3, 4),  # training levels
    limit=0,  # training records (0: the whole split of those levels)
    seq_len=1024,  # SFT rows, packed with whole examples (one level-4 example needs 392)
    prompt_len=288,  # generation prompt width (level-4 prompts reach 273 byte tokens)
    max_new_tokens=128,  # level-4 solutions reach 119; DPO/RLMEC rows hold prompt + this
  )
  return data_section(**{**fields, **overrides})


def sample_stage(*, limit, offset, num_samples, temperature, top_p=1.0, batch_size=128) -> CD:
  """A 'sample' stage: the SFT policy's samples of kj_arith training prompts."""
  return CD(
    dict(
      type='sample',
      policy='sft',
      data='task:train',
      limit=limit,
      offset=offset,
      num_samples=num_samples,
      temperature=temperature,
      top_p=top_p,
      batch_size=batch_size,
    )
  )


def accuracy_eval(*, seeds) -> CD:
  """Held-out kj_arith accuracy by level, sampled once per sampling seed in `seeds`, plus greedy."""
  return CD(
    dict(
      type='task_accuracy',
      split='test',
      groups=(1, 2, 3, 4),  # levels, `per_group` problems each
      per_group=250,
      seeds=seeds,
      temperature=0.7,
      greedy=True,
      batch_size=128,
    )
  )


def dpo_stage(loss_name):
  """DPO-family block: `dpo` with its loss_type, or the capo / d2po objectives."""
  if loss_name in DPO_LOSS_TYPES:
    method, loss = 'dpo', dict(loss_type=loss_name, beta=0.1, label_smoothing=0.0, simpo_gamma=0.5)
  elif loss_name == 'capo':
    method, loss = 'capo', dict(beta=0.1, label_smoothing=0.0)
  elif loss_name == 'd2po':
    method, loss = 'd2po', dict(beta=0.1, gamma=0.98)
  else:
    raise ValueError(f'dpo_loss={loss_name!r} is not one of {[*DPO_LOSS_TYPES, "capo", "d2po"]}')
  return _train(
    method,
    'DPO' if method == 'dpo' else method.upper(),
    data='pairs',
    init_from='sft',
    reference='sft',
    steps=1000,
    batch_size=32,
    optimizer=dict(lr=1e-6, warmup_steps=30, weight_decay=0.0, min_lr_ratio=0.0),
    options=dict(reference='precomputed'),  # or 'model' (frozen reference scored every step)
    loss=loss,
  )


def _stages(args) -> CD:
  stage = CD()
  stage.sft = _train(
    'sft',
    'SFT',
    data='task:train',
    steps=20_000,
    batch_size=32,
    optimizer=dict(lr=3e-4, warmup_steps=500),
  )
  if args.sft_from:
    stage.sft = CD(dict(type='params', label='SFT (imported)', path=args.sft_from))
  stage.samples = sample_stage(limit=8000, offset=0, num_samples=8, temperature=1.0)
  stage.pairs = CD(dict(type='pairs', data='samples', max_pairs_per_prompt=2, gold_fallback=False))
  stage.dpo = dpo_stage(args.dpo_loss)
  post = dict(init_from='sft', steps=1000, batch_size=32)
  frozen_lr = lambda lr, warmup=30, floor=0.0: dict(  # noqa: E731
    lr=lr, warmup_steps=warmup, weight_decay=0.0, min_lr_ratio=floor
  )
  stage.rft = _train(
    'rft',
    'RFT',
    data='samples',
    **post,
    optimizer=frozen_lr(3e-5),
    options=dict(max_per_prompt=0, with_gold=True),  # the paper: SFT data + correct samples
  )
  stage.rlmec_samples = sample_stage(limit=4000, offset=8000, num_samples=5, temperature=0.7)
  stage.rlmec_rewrites = CD(dict(type='minimal_edit', data='rlmec_samples'))
  stage.rlmec = _train(
    'rlmec',
    'RLMEC',
    data='rlmec_rewrites',
    **post,
    optimizer=frozen_lr(5e-6),
    loss=dict(eps=0.3, lam=1.0),
  )
  stage.grpo = grpo_stage(args.reward)
  return stage


def grpo_stage(reward: str) -> CD:
  """The online GRPO block on kj_arith training prompts, from the SFT policy (rewards by name:
  `exact_answer` or `relative_length`)."""
  return _train(
    'grpo',
    'GRPO',
    data='task:train',
    init_from='sft',
    reference='sft',  # used when loss.kl_coef > 0
    steps=500,
    batch_size=32,
    optimizer=dict(lr=1e-6, warmup_steps=20, weight_decay=0.0, min_lr_ratio=1.0),
    options=dict(
      group_size=8,
      reward=reward,
      reward_options=dict(tau=0.5, l_base=100.0, low=-0.5, high=0.5),
      temperature=1.0,
      sample_filter='all',  # or 'negative_only' / 'positive_only'
      advantage_scale='auto',  # 'auto' (the loss type's own) | 'group' | 'batch' | 'none'
      offline_injection=False,
      injection_max_accuracy=0.125,  # groups at or below this accuracy get a gold solution
    ),
    # GRPO family (kuaijax.losses.rl.GRPO_LOSS_TYPES): grpo | bnpo | dr_grpo | dapo | cispo;
    # clip_eps_high < 0 takes the loss type's default (dapo 0.28, cispo 4.0, else clip_eps).
    loss=dict(kl_coef=0.0, loss_type='bnpo', clip_eps=0.2, clip_eps_high=-1.0),
  )


def add_lora_rows(config) -> None:
  """In place: model role `policy_lora` (the policy's fields, by reference, with LoRA adapters on
  its attention projections and SwiGLU weights) and the rows `sft_more` (SFT continued, every parameter, at `lr`)
  and `sft_lora` (SFT continued with the adapters, at LORA_LR_FACTOR x `lr`), both from the SFT
  policy at the RFT row's steps x batch and schedule, appended to `config.stages`; `lr` is the RFT
  row's (the SFT schedule's final learning rate)."""
  policy = config.models.policy
  # Every field a reference to the policy's: overriding `models.policy.<field>` changes both.
  config.models[LORA_ROLE] = CD({key: policy.get_ref(key) for key in policy})
  config.models[LORA_ROLE].lora = CD(
    dict(rank=8, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS, rslora=False)
  )
  post = config.stage.rft
  lr = post.optimizer.lr
  budget = dict(init_from='sft', steps=post.train.steps, batch_size=post.train.batch_size)
  optimizer = lambda lr: dict(post.optimizer.to_dict(), lr=lr)  # noqa: E731
  config.stage.sft_more = _train(
    'sft', 'SFT (continued)', data='task:train', **budget, optimizer=optimizer(lr)
  )
  config.stage.sft_lora = _train(
    'sft',
    'SFT (continued, LoRA r=8)',
    data='task:train',
    model=LORA_ROLE,
    **budget,
    optimizer=optimizer(round(LORA_LR_FACTOR * lr, 12)),
  )
  for name in ('sft_more', 'sft_lora'):
    config.stage[name].train.update(post.train.to_dict())
  rows = config.stages.replace(',', '+').split('+')
  config.stages = '+'.join([*rows, *(n for n in ('sft_more', 'sft_lora') if n not in rows)])


def _runlocal(config, *, sft_from: str) -> None:
  """Trained on levels 1-2 only (level 3 is held out as harder, longer problems)."""
  stage = config.stage
  config.data.update(levels=(1, 2), seq_len=512, prompt_len=224, max_new_tokens=96)
  config.models.policy.update(
    d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384, dtype='float32'
  )
  if not sft_from:
    stage.sft.train.update(stage_steps(900, 8))
    stage.sft.optimizer.update(lr=3e-3, warmup_steps=30)
  for name, lr, warmup in (('dpo', 5e-5, 4), ('rft', 3e-4, 4), ('rlmec', 5e-5, 4)):
    stage[name].train.update(stage_steps(40, 8))
    stage[name].optimizer.update(lr=lr, warmup_steps=warmup)
  stage.grpo.train.update(stage_steps(20, 8))
  stage.grpo.optimizer.update(lr=2e-5, warmup_steps=2)
  stage.samples.update(limit=192, num_samples=4, batch_size=60)
  stage.rlmec_samples.update(limit=96, num_samples=4, batch_size=60)
  config.evals.arith.update(groups=(1, 2, 3), per_group=40, seeds=(0, 1, 2), batch_size=60)


def get_config(arg=None):
  args = parse_arg(
    arg,
    runlocal=False,
    stages='sft+dpo+grpo',
    dpo_loss='sigmoid',
    reward='exact_answer',
    sft_from='',
    seeds='0',
    lora=False,
  )
  config = trainer_config(progress=True)
  config.experiment = 'arith_posttrain'
  # Training seeds: the pipeline runs once per seed in <workdir>/seed_<s>/ (each stage's seeds are
  # derived from it and the stage's name); `seeds=0+1+2` runs three.
  config.seeds = parse_seeds(args.seeds)
  config.stages = args.stages
  config.data = arith_data()
  policy = lm_model(
    vocab_size=384, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, d_ff=2048
  )
  config.models = CD(dict(policy=policy))
  config.stage = _stages(args)
  config.evals = CD(dict(arith=accuracy_eval(seeds=(0, 1, 2, 3, 4))))
  if args.runlocal:
    _runlocal(config, sft_from=args.sft_from)
  if args.lora:
    add_lora_rows(config)
  return config


def comparison_config(arg, args, *, reference_row: str) -> CD:
  """The base of a row-comparison config on this pipeline (configs/grpo/analysis.py,
  configs/d2po/arith.py), from its parsed `args` (runlocal, repro, gpu, seeds, sft_from,
  sft_per_seed): the runlocal sizes for `runlocal`, `repro` and `gpu`, an imported SFT policy for
  `sft_from`, 3 training seeds by default for `repro` / `gpu`, `config.reference_row` (the table's
  paired differences are to that row).

  `repro` / `gpu` train the SFT policy once (seed 0, in `<workdir>/shared/sft`) and every training
  seed post-trains it: the seeds vary the compared runs, not their common start (`sft_per_seed=True`
  trains one SFT policy per seed instead). Their widths fit the trained levels 1-2 (prompts up to
  178 byte tokens, solutions up to 61 with the stop token), which cuts the padded rows of the
  post-training steps by a fifth. `gpu` keeps repro's SFT policy (its measured headroom) and spends
  the accelerator on longer post-training (set by each config)."""
  if args.runlocal + args.repro + args.gpu > 1:
    raise ValueError(f'config arg {arg!r}: runlocal, repro and gpu are alternatives; pick one')
  reproduction = args.repro or args.gpu
  base = ['runlocal'] if args.runlocal or reproduction else []
  base += [f'sft_from={args.sft_from}'] if args.sft_from else []
  config = get_config(','.join(base) or None)
  config.seeds = parse_seeds(args.seeds or ('0+1+2' if reproduction else '0'))
  config.reference_row = reference_row
  if reproduction:
    config.data.update(prompt_len=192, max_new_tokens=64)
    if not args.sft_from and not args.sft_per_seed:
      config.stage.sft.shared_seed = 0
  return config


def trained_levels_eval(config) -> None:
  """Evaluate on the trained levels 1-2 only: 100 problems each, 4 sampling runs (in place)."""
  config.evals.arith.update(groups=(1, 2), per_group=100, seeds=(0, 1, 2, 3), batch_size=100)
