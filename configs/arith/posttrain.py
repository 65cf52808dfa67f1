"""kj_arith post-training: SFT, then DPO on the SFT policy's own (correct, wrong) pairs and online GRPO.

Table: held-out accuracy by difficulty level for SFT vs DPO vs GRPO, sampled over several seeds
(mean ± std) plus greedy (experiments/arith/README.md has our numbers).

runlocal (0.84M-parameter byte-level policy trained on levels 1-2, evaluated on levels 1-3; 719 CPU-s,
15 min 50 s wall on 2 CPU cores shared with other jobs; SFT reaches ~43% on level 1 and ~6% on
level 2, DPO and GRPO stay within the seed spread of it; see experiments/arith/README.md):
  python -m kuaijax.main --config=configs/arith/posttrain.py:runlocal --workdir=workdirs/arith_posttrain
full scale (one GPU or TPU host; ~76M parameters, levels 1-4; not run yet):
  python -m kuaijax.main --config=configs/arith/posttrain.py --workdir=gs://.../arith_posttrain
Variants: `stages=sft+dpo+rlmec+grpo` adds the RLMEC row; `dpo_loss=ipo` (any name of
kuaijax.train.preference_task.PREFERENCE_LOSSES) and `reward=relative_length` pick the objectives.
A stage alone from an existing SFT run:
  ... --config=configs/arith/posttrain.py:runlocal,stages=grpo --config.init_from=workdirs/arith_posttrain/sft
"""

import ml_collections

from kuaijax.config_lib import parse_arg, trainer_config


def _stage(**options):
  """A stage section: trainer overrides (`train`, `optimizer`) plus the stage's own options."""
  return ml_collections.ConfigDict(
    dict(
      train=ml_collections.ConfigDict(options.pop('train')),
      optimizer=ml_collections.ConfigDict(options.pop('optimizer')),
      **options,
    )
  )


def get_config(arg=None):
  args = parse_arg(
    arg, runlocal=False, stages='sft+dpo+grpo', dpo_loss='sigmoid', reward='exact_answer'
  )
  config = trainer_config()
  config.experiment = 'arith_posttrain'
  config.stages = args.stages
  config.data = ml_collections.ConfigDict(
    dict(
      name='kj_arith',
      data_dir='',  # '' -> $KUAIJAX_DATA_DIR or ~/tensorflow_datasets
      tokenizer='byte',
      spm_model_path='',
      train_levels=(1, 2, 3, 4),
      train_examples=0,  # 0: the whole train split (of those levels)
      seq_len=1024,  # SFT rows, packed with whole examples (one level-4 example needs 392)
      pack=True,
      prompt_len=288,  # generation prompt width (level-4 prompts reach 273 byte tokens)
      max_new_tokens=128,  # level-4 solutions reach 119; DPO/RLMEC rows hold prompt + this
      seed=1,
    )
  )
  config.model = ml_collections.ConfigDict(
    dict(
      vocab_size=384,
      d_model=768,
      num_layers=12,
      num_heads=12,
      num_kv_heads=4,
      d_ff=2048,
      mlp='swiglu',
      tie_embeddings=True,
      init_std=0.02,
      rope_base=10000.0,
      dtype='bfloat16',
      param_dtype='float32',
      remat='none',
    )
  )
  steps = lambda n, bs, **kw: dict(
    steps=n, batch_size=bs, log_every=max(1, n // 20), checkpoint_every=max(1, n // 4), **kw
  )
  config.sft = _stage(train=steps(20_000, 32), optimizer=dict(lr=3e-4, warmup_steps=500))
  config.dpo = _stage(
    train=steps(1000, 32),
    optimizer=dict(lr=1e-6, warmup_steps=30, weight_decay=0.0, min_lr_ratio=0.0),
    loss_type=args.dpo_loss,
    beta=0.1,
    reference='precomputed',  # or 'model' (frozen reference scored every step)
    label_smoothing=0.0,
    simpo_gamma=0.5,
    d2po_gamma=0.98,
    problems=8000,
    problem_offset=0,
    num_samples=8,
    temperature=1.0,
    max_pairs_per_problem=2,
    gold_fallback=False,  # True: problems without a correct sample use the gold solution as chosen
  )
  config.rlmec = _stage(
    train=steps(1000, 32),
    optimizer=dict(lr=5e-6, warmup_steps=30, weight_decay=0.0, min_lr_ratio=0.0),
    eps=0.3,
    lam=1.0,
    problems=4000,
    problem_offset=8000,
    num_samples=5,
    temperature=0.7,
  )
  config.grpo = _stage(
    train=steps(500, 32),
    optimizer=dict(lr=1e-6, warmup_steps=20, weight_decay=0.0, min_lr_ratio=1.0),
    group_size=8,
    reward=args.reward,
    reward_options=dict(tau=0.5, l_base=100.0, low=-0.5, high=0.5),
    temperature=1.0,
    kl_coef=0.0,
    # GRPO family (kuaijax.losses.rl.GRPO_LOSS_TYPES): grpo | bnpo | dr_grpo | dapo | cispo.
    loss_type='bnpo',
    advantage_scale='auto',  # 'auto' (the loss type's own) | 'group' | 'batch' | 'none'
    clip_eps=0.2,
    clip_eps_high=-1.0,  # < 0: the loss type's default (dapo 0.28, cispo 4.0, else clip_eps)
    sample_filter='all',  # or 'negative_only' / 'positive_only'
    offline_injection=False,
  )
  config.eval = ml_collections.ConfigDict(
    dict(
      split='test',
      levels=(1, 2, 3, 4),
      problems_per_level=250,
      seeds=(0, 1, 2, 3, 4),
      temperature=0.7,
      batch_size=128,
    )
  )
  config.train.update(progress=True)

  if args.runlocal:
    # Trained on levels 1-2 only (level 3 is held out as harder, longer problems).
    config.data.update(train_levels=(1, 2), seq_len=512, prompt_len=224, max_new_tokens=96)
    config.model.update(
      d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384, dtype='float32'
    )
    config.sft.train.update(steps(900, 8))
    config.sft.optimizer.update(lr=3e-3, warmup_steps=30)
    config.dpo.train.update(steps(40, 8))
    config.dpo.optimizer.update(lr=5e-5, warmup_steps=4)
    config.dpo.update(problems=192, num_samples=4)
    config.rlmec.train.update(steps(40, 8))
    config.rlmec.optimizer.update(lr=5e-5, warmup_steps=4)
    config.rlmec.update(problems=96, num_samples=4)
    config.grpo.train.update(steps(20, 8))
    config.grpo.optimizer.update(lr=2e-5, warmup_steps=2)
    config.eval.update(levels=(1, 2, 3), problems_per_level=40, seeds=(0, 1, 2), batch_size=60)
  return config
