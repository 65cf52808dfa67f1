"""RLMEC on kj_arith end to end: a trained generative reward model (GRM) vs SFT / RFT / DPO / GRPO /
RLMEC with the programmatic reward, 3 seeds (experiments/rlmec/README.md has the numbers).

Stages (`config.stage`, run through the stage pipeline, per-seed folders `<workdir>/seed_<s>/`):
sft -> samples -> teacher (program) -> grm_data -> grm (SFT on locate/rewrite/copy targets, from the
SFT policy) -> grm_rewrite (the GRM as teacher, compared with the program teacher) -> rewards (GRM
keep-probabilities) -> rlmec; baselines on the same SFT policy and samples with the same number of
update steps and batch size: sft_more (SFT continued), rft, pairs -> dpo, grpo (online),
prog_rewards -> rlmec_prog. Seeds after the first reuse the first seed's SFT policy.

runlocal (2 CPU cores; byte tokens, 0.2M-parameter policy, levels 1-2 trained, level 3 held out;
one seed took 35.5 min of stage wall time on 2 cores shared with other jobs, SFT 994 s of it; the
policy reaches ~1-7% on level 1, so the table only shows that every stage runs; see the README):
  python -m kuaijax.main --config=configs/rlmec/arith.py:runlocal --workdir=workdirs/rlmec_arith
gpu (one GPU; 3.2M parameters; seed 0 on an H200: 5 min 51 s wall, every row 65-67% over levels
1-3 (100 / ~92 / ~7%), RLMEC within the sampling spread of SFT; see the README):
  python -m kuaijax.main --config=configs/rlmec/arith.py:gpu --workdir=workdirs/rlmec_arith_gpu
full scale (the paper's hyper-parameters on a ~76M model, levels 1-4 trained; not run):
  python -m kuaijax.main --config=configs/rlmec/arith.py --workdir=gs://.../rlmec_arith
Args: `stages=` the rows to run (their inputs are added), `seeds=0+1+2`.
"""

import ml_collections

from kuaijax.config_lib import (
  data_section,
  lm_model,
  parse_arg,
  parse_seeds,
  stage_steps,
  train_stage,
  trainer_config,
)

CD = ml_collections.ConfigDict

ROWS = 'sft,sft_more,rft,dpo,grpo,rlmec_prog,rlmec'


def _steps(n, batch_size):
  return stage_steps(n, batch_size, checkpoints=2)


def _train(method, label, data, *, steps, batch_size, lr, init_from='sft', **fields):
  """A training stage block; post-training stages start from the SFT policy."""
  optimizer = dict(lr=lr, warmup_steps=max(1, steps // 30), weight_decay=0.0, min_lr_ratio=0.0)
  return train_stage(
    method,
    label,
    data=data,
    steps=steps,
    batch_size=batch_size,
    optimizer=optimizer,
    init_from=init_from,
    checkpoints=2,
    **{'evaluate': True, **fields},
  )


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, gpu=False, stages=ROWS, seeds='0+1+2')
  config = trainer_config()
  config.experiment = 'rlmec'
  config.seeds = parse_seeds(args.seeds)  # training seeds: one pipeline each, seed_<s>/
  config.stages = args.stages.replace('+', ',')
  config.data = data_section(
    task='kj_arith',
    tokenizer='byte',
    levels=(1, 2, 3, 4),  # training levels
    limit=0,
    seq_len=2048,
    prompt_len=288,
    max_new_tokens=128,
  )
  policy = lm_model(
    vocab_size=384, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, d_ff=2048
  )
  # The GRM is a model role of its own (the paper: the same architecture as the policy).
  config.models = CD(dict(policy=policy, grm=CD(policy.to_dict())))
  post, bs, lr = 1000, 128, 5e-6  # paper: 3 epochs at lr 5e-6, 128 sequences per step
  s = CD()
  s.sft = _train('sft', 'SFT', 'task:train', steps=20_000, batch_size=32, lr=3e-4, init_from='')
  s.sft.optimizer.update(warmup_steps=500, weight_decay=0.1, min_lr_ratio=0.1)
  s.samples = CD(
    dict(
      type='sample',
      policy='sft',
      data='task:train',
      limit=8000,
      offset=0,
      num_samples=5,
      temperature=0.7,
      top_p=0.95,
      batch_size=128,
    )
  )
  s.teacher = CD(
    dict(
      type='teacher',
      data='samples',
      teacher='program',
      compare='',
      batch_size=128,
      max_prompt_len=0,
    )
  )
  s.grm_data = CD(dict(type='grm_data', data='teacher'))
  s.grm = _train(
    'sft', 'GRM', 'grm_data', steps=3000, batch_size=32, lr=2e-5, evaluate=False, model='grm'
  )
  s.grm_rewrite = CD(
    dict(
      type='teacher',
      data='samples',
      teacher='grm',
      compare='teacher',
      batch_size=128,
      max_prompt_len=1024,
    )
  )
  s.rewards = CD(
    dict(
      type='rewards',
      data='grm_rewrite',
      grm='grm',
      auc_data='teacher',
      batch_size=128,
      max_len=2048,
    )
  )
  s.prog_rewards = CD(
    dict(type='rewards', data='teacher', grm='', auc_data='teacher', batch_size=128, max_len=2048)
  )
  s.rlmec = _train(
    'rlmec', 'RLMEC (GRM)', 'rewards', steps=post, batch_size=bs, lr=lr, loss=dict(eps=0.3, lam=1.0)
  )
  s.rlmec_prog = _train(
    'rlmec',
    'RLMEC (programmatic)',
    'prog_rewards',
    steps=post,
    batch_size=bs,
    lr=lr,
    loss=dict(eps=0.3, lam=1.0),
  )
  s.sft_more = _train('sft', 'SFT (continued)', 'task:train', steps=post, batch_size=bs, lr=lr)
  s.rft = _train(
    'rft',
    'RFT',
    'samples',
    steps=post,
    batch_size=bs,
    lr=lr,
    options=dict(max_per_prompt=0, with_gold=False),
  )
  s.pairs = CD(dict(type='pairs', data='samples', max_pairs_per_prompt=2, gold_fallback=False))
  s.dpo = _train(
    'dpo',
    'DPO',
    'pairs',
    steps=post,
    batch_size=bs,
    lr=lr,
    reference='sft',
    options=dict(reference='precomputed'),
    loss=dict(loss_type='sigmoid', beta=0.1, label_smoothing=0.0, simpo_gamma=0.5),
  )
  s.grpo = _train(
    'grpo',
    'GRPO (exact-answer reward)',
    'task:train',
    steps=post,
    batch_size=bs // 8,  # prompts per step; x group_size 8 = bs sequences
    lr=lr,
    reference='sft',
    options=dict(
      group_size=8,
      reward='exact_answer',
      reward_options=dict(tau=0.5, l_base=100.0, low=-0.5, high=0.5),
      temperature=1.0,
      sample_filter='all',
      offline_injection=False,
    ),
    loss=dict(kl_coef=0.0, clip_eps=0.2, aggregation='token_mean'),
  )
  config.stage = s
  config.evals = CD(
    dict(
      arith=CD(
        dict(
          type='task_accuracy',
          split='test',
          groups=(1, 2, 3, 4),
          per_group=250,
          seeds=(0, 1, 2),
          temperature=0.7,
          greedy=True,
          batch_size=128,
        )
      )
    )
  )
  config.train.update(progress=True)

  small = args.runlocal or args.gpu
  if small:
    # Trained on levels 1-2; level 3 is never trained on.
    config.data.update(levels=(1, 2), seq_len=768, prompt_len=224, max_new_tokens=96)
    config.evals.arith.update(groups=(1, 2, 3))
    s.teacher.max_prompt_len = 640
    s.grm_rewrite.max_prompt_len = 640
    for name in ('rewards', 'prog_rewards'):
      s[name].max_len = 768
  if args.gpu:
    config.models.policy.update(
      d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=768, dtype='float32'
    )
    sizes = dict(sft=(2000, 32, 2e-3), grm=(1000, 32, 1e-3))
    post_steps, post_bs, post_lr = 100, 32, 5e-5
    s.samples.update(limit=1000, offset=0, batch_size=250)
    config.evals.arith.update(per_group=100, batch_size=150)
    for name in ('teacher', 'grm_rewrite', 'rewards', 'prog_rewards'):
      s[name].batch_size = 250
  elif args.runlocal:
    config.models.policy.update(
      d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=192, dtype='float32'
    )
    sizes = dict(sft=(300, 8, 3e-3), grm=(120, 8, 2e-3))
    post_steps, post_bs, post_lr = 20, 8, 5e-5
    s.samples.update(limit=48, num_samples=4, batch_size=48)
    config.evals.arith.update(per_group=30, seeds=(0,), batch_size=90)
    for name in ('teacher', 'grm_rewrite', 'rewards', 'prog_rewards'):
      s[name].batch_size = 32
  if small:
    for name, (steps, batch_size, stage_lr) in sizes.items():
      s[name].train.update(_steps(steps, batch_size))
      s[name].optimizer.update(lr=stage_lr, warmup_steps=max(1, steps // 30))
    for name in ('sft_more', 'rft', 'dpo', 'rlmec', 'rlmec_prog', 'grpo'):
      batch = post_bs // 8 if name == 'grpo' else post_bs
      s[name].train.update(_steps(post_steps, batch))
      s[name].optimizer.update(lr=post_lr, warmup_steps=max(1, post_steps // 10))
    config.train.update(progress=False)
  config.models.grm = CD(config.models.policy.to_dict())
  return config
