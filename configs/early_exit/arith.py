"""Early exit without extra heads (final norm + shared LM head on every layer) on kj_arith.

SFT a small byte-level model on kj_arith, then the per-layer read-out analysis and early-exit
decoding over exit settings: accuracy, average layers used, teacher-forced perplexity and the
speed-up against normal decoding measured side by side (experiments/early_exit/README.md has the
method notes and our numbers).

runlocal (6 layers, 1.2M parameters, 300 steps; 2 CPU cores shared with other jobs: 223 CPU-s, 38 min
wall; per-layer agreement with the last layer 47% at layer 1 -> 91% at layer 5; confidence 0.99 exits
after 5.2 of 6 layers at teacher-forced perplexity 1.93 vs 1.75 at full depth; speed-ups were within
the timing noise of the shared machine; details in experiments/early_exit/README.md):
  python -m kuaijax.main --config=configs/early_exit/arith.py:runlocal --workdir=workdirs/early_exit
full (one accelerator host; 12 layers, more steps; not run yet):
  python -m kuaijax.main --config=configs/early_exit/arith.py --workdir=workdirs/early_exit_full
"""

import ml_collections

from kuaijax.config_lib import lm_model, parse_arg, trainer_config


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  config = trainer_config()
  config.experiment = 'early_exit'
  config.data = ml_collections.ConfigDict(
    dict(
      data_dir='',  # '' -> $KUAIJAX_DATA_DIR or ~/tensorflow_datasets
      tokenizer='byte',
      spm_model_path='',
      train_levels=(1, 2),
      train_examples=20000,
      seq_len=1024,
      seed=1,
    )
  )
  config.model = lm_model(
    vocab_size=259,
    d_model=512,
    num_layers=12,
    num_heads=8,
    num_kv_heads=4,
    d_ff=1536,
    dtype='float32',
  )
  config.train.update(steps=5000, batch_size=32, log_every=100, checkpoint_every=1000)
  config.train.eval_every = 10**9
  config.optimizer.update(lr=1e-3, warmup_steps=200)
  config.exit = ml_collections.ConfigDict(
    dict(
      thresholds=(0.99, 0.95, 0.9, 0.8, 0.6),  # confidence rule: max softmax prob >= threshold
      agreement=True,  # also the consecutive-layer agreement rule
      gate_thresholds=(0.9, 0.7),  # the learned gate (fitted on frozen features)
    )
  )
  config.eval = ml_collections.ConfigDict(
    dict(
      levels=(1, 2),
      problems_per_level=100,
      gate_problems=200,  # TRAINING problems whose features fit the gate
      score_len=256,  # teacher-forced rows (prompt + gold solution)
      prompt_len=224,
      max_new_tokens=96,
      timing_repeats=3,
    )
  )
  if args.runlocal:
    config.data.update(train_examples=2000, seq_len=512)
    config.model.update(d_model=128, num_layers=6, num_heads=4, num_kv_heads=2, d_ff=384)
    config.train.update(steps=300, batch_size=4, log_every=20, checkpoint_every=300)
    config.optimizer.update(lr=3e-3, warmup_steps=30)
    config.eval.update(problems_per_level=12, gate_problems=32, max_new_tokens=64, timing_repeats=2)
  return config
