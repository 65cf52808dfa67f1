"""LM pretraining setups that several config files share (configs/ is not a package, and configs
never load each other by path): the kj_lm_mixture decoder (configs/lm/mixture.py and its sweep
configs/lm/lr_sweep.py) and the Top-P MoE paper's data / base model / optimizer / evaluators
(configs/topp_moe/compare.py and configs/scaling/dense_vs_moe.py).

Every function returns pipeline config parts (`kuaijax.stages.runner`); the config files add their
seeds, model roles and stages.
"""

from __future__ import annotations

import ml_collections

from kuaijax.config_lib import lm_data, lm_model, pretrain_stage, trainer_config

CD = ml_collections.ConfigDict


def mixture_lm(runlocal: bool) -> ml_collections.ConfigDict:
  """The decoder LM on kj_lm_mixture as a one-stage pipeline: stage 'lm' trains role 'policy'
  (~150M parameters at full size; runlocal: 128 wide, 4 layers, 600 steps of 16 x 256 tokens)."""
  config = trainer_config()
  config.experiment = 'lm'
  config.data = lm_data()
  # vocab: the byte tokenizer (259) padded to a multiple of 128
  policy = lm_model(
    vocab_size=384,
    d_model=768,
    num_layers=12,
    num_heads=12,
    num_kv_heads=4,
    d_ff=2048,
    remat='dots',
  )
  config.models = CD(dict(policy=policy))
  config.stages = 'lm'
  config.stage = CD(dict(lm=pretrain_stage('policy')))
  config.eval = CD(dict(unigram_max_examples=0))  # 0: whole train split
  # Evaluators by name (kuaijax.evals.registry), run every train.eval_every steps.
  config.evals = CD(dict(lm=dict(type='lm_loss')))
  config.train.update(
    steps=50_000, batch_size=256, log_every=100, eval_every=2000, checkpoint_every=2000
  )
  config.optimizer.update(lr=6e-4, warmup_steps=2000)
  if runlocal:
    config.data.update(seq_len=256, eval_batch_size=32, eval_batches=6)
    policy.update(
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      d_ff=384,
      dtype='float32',
      remat='none',
    )
    config.train.update(
      steps=600, batch_size=16, log_every=25, eval_every=200, checkpoint_every=100
    )
    config.optimizer.update(lr=2e-3, warmup_steps=50)
    config.eval.unigram_max_examples = 5000
  return config


MC_TASKS = (
  ('piqa', 'piqa'),
  ('hellaswag', 'hellaswag'),
  ('arc_easy', 'arc'),
  ('csqa', 'csqa'),
  ('bbh', 'bbh'),
)


def moe_lm(runlocal: bool) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """The Top-P MoE paper's setup (arXiv 2403.07652): (config with the trainer sections, data and
  evaluators; the base model section every variant starts from; the options every MoE layer
  shares). Full size: LLaMA-style 24 x 1024, vocab 32000 SentencePiece, 16 experts of width 2816,
  AdamW (0.9, 0.95) wd 0.1, cosine 3e-4 -> 3e-5 after 2000 warm-up steps, 2048 x 2048 tokens per
  step, 23842 steps (100B tokens). runlocal: 96 wide, 4 layers, 8 experts, byte tokens on
  kj_lm_mixture, 200 steps of 16 x 128 tokens."""
  config = trainer_config()
  config.data = lm_data(
    name='jsonl:/data/redpajama/{split}.jsonl',
    tokenizer='sentencepiece',
    spm_vocab_size=32000,
    spm_train_examples=200_000,
    seq_len=2048,
    task_names=('text',),
  )
  model = lm_model(
    vocab_size=32000,
    d_model=1024,
    num_layers=24,
    num_heads=16,
    num_kv_heads=16,
    d_ff=2816,
    mlp_options={},
    tie_embeddings=False,
    init_std=0.006,
    remat='dots',
  ).to_dict()
  # Options shared by every MoE variant (`mlp_options`, kuaijax.models.moe.MoEConfig): k_max 0 =
  # uncapped Top-P (the paper; k_max > 0 caps experts per token, counted as truncation); dispatch
  # 'auto' = the faster exact strategy of the backend (never all experts for Top-P).
  moe_layer = dict(num_experts=16, expert_d_ff=2816, dispatch='auto', k_max=0)
  # Evaluators by name (kuaijax.evals.registry): LM loss, experts per token, token loss vs experts
  # selected (Spearman), and zero-shot multiple-choice accuracy (the paper's table; no tasks = not
  # run), from local jsonl files or prepared tfds data sets; entries {name, source, format, split,
  # data_dir, limit}.
  config.evals = CD()
  config.evals.lm = dict(type='lm_loss')
  config.evals.moe = dict(type='moe_stats')
  config.evals.token = dict(type='moe_token_loss')
  config.evals.mc = CD(
    dict(
      type='multiple_choice',
      tasks=tuple(
        dict(name=name, source=f'jsonl:/data/eval/{name}/{{split}}.jsonl', format=fmt)
        for name, fmt in MC_TASKS
      ),
      max_len=512,
      batch_size=64,
    )
  )
  config.train.update(
    steps=23842, batch_size=2048, log_every=50, eval_every=1000, checkpoint_every=1000
  )
  config.optimizer.update(
    lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, b1=0.9, b2=0.95, weight_decay=0.1
  )
  if runlocal:
    config.data.update(
      name='kj_lm_mixture',
      tokenizer='byte',
      spm_vocab_size=8192,
      seq_len=128,
      task_names=('code', 'arith', 'copy', 'recall'),
      eval_batch_size=32,
      eval_batches=4,
    )
    model.update(
      vocab_size=384,
      d_model=96,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      d_ff=192,
      tie_embeddings=True,
      init_std=0.02,
      dtype='float32',
      remat='none',
    )
    moe_layer.update(num_experts=8, expert_d_ff=192)
    config.evals.mc.tasks = ()
    config.train.update(
      steps=200, batch_size=16, log_every=20, eval_every=100, checkpoint_every=100
    )
    config.optimizer.update(lr=3e-3, min_lr_ratio=0.1, warmup_steps=20)
  return config, model, moe_layer
