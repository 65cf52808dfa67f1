"""Early exit without extra heads (final norm + shared LM head on every layer) on kj_arith.

Stage pipeline (`kuaijax.stages`): `sft` (type train, method sft) trains a small byte-level model on
kj_arith gold solutions (`task:train`), once per training seed in `<workdir>/seed_<s>/`; the
evaluator 'early_exit' then runs the per-layer read-out analysis and early-exit decoding over exit
settings: accuracy, average layers used, teacher-forced perplexity and the speed-up against normal
decoding measured side by side (experiments/early_exit/README.md has the method notes and our
numbers).

runlocal (6 layers, 1.2M parameters, 300 steps; recorded before the stage pipeline, one training
seed, 2 CPU cores shared with ~8 other jobs (load average ~13): 223 CPU-s, 38 min wall; per-layer
agreement with the last layer 47% at layer 1 -> 91% at layer 5; confidence 0.99 exits after 5.2 of
6 layers at teacher-forced perplexity 1.93 vs 1.75 at full depth; speed-ups (then best of 2) were
within the timing noise of the shared machine; details in experiments/early_exit/README.md; wall
time not re-measured since 5 interleaved rounds with the median of per-round ratios replaced best of
2, which adds about 3 early-exit and 3 full-depth decodes per setting and batch):
  python -m kuaijax.main --config=configs/early_exit/arith.py:runlocal --workdir=workdirs/early_exit
full (one accelerator host; 12 layers, more steps; not run yet):
  python -m kuaijax.main --config=configs/early_exit/arith.py --workdir=workdirs/early_exit_full
Args: `seeds=0+1+2` the training seeds (default 0).
"""

import ml_collections

from kuaijax.config_lib import (
  data_section,
  lm_model,
  parse_arg,
  parse_seeds,
  train_stage,
  trainer_config,
)

CD = ml_collections.ConfigDict


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, seeds='0')
  config = trainer_config()
  config.experiment = 'early_exit'
  config.seeds = parse_seeds(args.seeds)
  config.data = data_section(
    task='kj_arith',
    tokenizer='byte',
    levels=(1, 2),  # training levels (also those of the gate's training problems)
    limit=20000,  # kj_arith training problems
    seq_len=1024,  # packed SFT rows
    prompt_len=224,
    max_new_tokens=96,
  )
  config.models = CD(dict(policy=_model()))
  config.stage = CD(dict(sft=_sft()))
  config.stages = 'sft'
  config.evals = CD(dict(early_exit=_evaluator()))
  if args.runlocal:
    _runlocal(config)
  return config


def _model():
  return lm_model(
    vocab_size=259,
    d_model=512,
    num_layers=12,
    num_heads=8,
    num_kv_heads=4,
    d_ff=1536,
    dtype='float32',
  )


def _sft():
  return train_stage(
    'sft',
    'SFT',
    data='task:train',
    steps=5000,
    batch_size=32,
    optimizer=dict(lr=1e-3, warmup_steps=200),
    logs=50,
    checkpoints=5,
  )


def _evaluator():
  return CD(
    dict(
      type='early_exit',
      split='test',
      groups=(1, 2),  # levels, `per_group` problems each
      per_group=100,
      thresholds=(0.99, 0.95, 0.9, 0.8, 0.6),  # confidence rule: max softmax prob >= threshold
      agreement=True,  # also the consecutive-layer agreement rule
      gate_thresholds=(0.9, 0.7),  # the learned gate (fitted on frozen features)
      gate_problems=200,  # TRAINING problems whose features fit the gate
      score_len=256,  # teacher-forced rows (prompt + gold solution)
      prompt_len=224,
      max_new_tokens=96,
      timing_rounds=5,  # interleaved early-exit / full-depth rounds (kuaijax.benchmarking)
    )
  )


def _runlocal(config):
  config.data.update(limit=2000, seq_len=512)
  config.models.policy.update(d_model=128, num_layers=6, num_heads=4, num_kv_heads=2, d_ff=384)
  config.stage.sft.train.update(steps=300, batch_size=4, log_every=20, checkpoint_every=300)
  config.stage.sft.optimizer.update(lr=3e-3, warmup_steps=30)
  config.evals.early_exit.update(per_group=12, gate_problems=32, max_new_tokens=64, timing_rounds=5)
