"""Self-Agreement vs Self-Consistency / USC / greedy CoT on a toy model (kj_arith + a word task).

One SFT run teaches a small byte-level model the policy (kj_arith with and without the answer
trigger, a word task) and a generic aggregation task built only from training problems; then
accuracy vs k paths on held-out test questions for greedy, SC, USC and SA, mean ± std over the
sampling seeds, in the 'trigger' and the 'mixed' (no trigger) scenario
(experiments/self_agreement/README.md has the method notes and our numbers).

runlocal (4 layers, d=128, 300 steps; 2 CPU cores shared with other jobs: 549 CPU-s, 71 min wall;
the toy stays weak: greedy 8.3% on the trigger scenario, SC / USC / SA 0-4% at every k, so the
paper's claims are neither confirmed nor refuted; details in experiments/self_agreement/README.md):
  python -m kuaijax.main --config=configs/self_agreement/toy.py:runlocal --workdir=workdirs/self_agreement
full (one accelerator host; larger model, more steps and problems; not run yet):
  python -m kuaijax.main --config=configs/self_agreement/toy.py --workdir=workdirs/self_agreement_full
The SFT is a plain trainer run (kuaijax.train.trainer.train), not a `config.stages` pipeline.
A pretrained causal LM (a Hugging Face folder: config.json, safetensors, tokenizer.json) instead of
the toy: `hf=<folder>` evaluates it as it is (no SFT; the paper's SA / USC instructions, whole
solutions in the aggregation prompts); add `--config.train.steps=N` to fine-tune it on the toy
tasks first:
  python -m kuaijax.main --config=configs/self_agreement/toy.py:hf=/models/Qwen2.5-0.5B \
    --workdir=workdirs/self_agreement_qwen
"""

import ml_collections

from kuaijax.config_lib import lm_model, parse_arg, trainer_config


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, hf='')
  config = trainer_config()
  config.experiment = 'self_agreement'
  config.data = ml_collections.ConfigDict(
    dict(
      data_dir='',  # '' -> $KUAIJAX_DATA_DIR or ~/tensorflow_datasets
      tokenizer='byte',
      spm_model_path='',
      train_levels=(1, 2),
      train_examples=4000,  # kj_arith train problems (each in the trigger and no-trigger format)
      word_examples=2000,  # word-task training questions
      seq_len=1024,  # packed rows; a k=20 aggregation example is ~800 byte tokens
      seed=1,
    )
  )
  config.aggregation = ml_collections.ConfigDict(
    dict(sets=6000, k_choices=(1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20))
  )
  config.model = lm_model(
    vocab_size=259,
    d_model=384,
    num_layers=8,
    num_heads=6,
    num_kv_heads=2,
    d_ff=1024,
    dtype='float32',
  )
  config.train.update(
    steps=6000, batch_size=16, log_every=100, checkpoint_every=1000, eval_every=10**9
  )
  config.optimizer.update(lr=1e-3, warmup_steps=200)
  config.eval = ml_collections.ConfigDict(
    dict(
      scenarios=('trigger', 'mixed'),
      levels=(1, 2),
      problems_per_level=100,
      word_questions=100,
      ks=(1, 3, 5, 10, 20),
      seeds=(0, 1, 2, 3, 4),
      temperature=0.7,
      top_k=40,  # 0: off
      max_new_tokens=80,
      # 'toy': short instructions and one line per solution (what the toy SFT taught); 'paper':
      # the paper's SA / USC instructions and whole solutions (pretrained models).
      prompts='toy',
      aggregate_tokens=8,  # reply budget of the SA call (USC: half of it)
    )
  )
  if args.runlocal:
    config.data.update(train_examples=1200, word_examples=500)
    config.aggregation.update(sets=2000)
    config.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384)
    config.train.update(steps=300, batch_size=4, log_every=20, checkpoint_every=300)
    config.optimizer.update(lr=3e-3, warmup_steps=30)
    config.eval.update(problems_per_level=12, word_questions=12, max_new_tokens=64)
  if args.hf:
    from kuaijax.hf import model_io

    config.init_from_hf = args.hf
    config.model = ml_collections.ConfigDict(model_io.model_section(args.hf, dtype='float32'))
    config.data.tokenizer = 'hf'
    config.train.steps = 0  # 0: evaluate the imported model as it is
    config.eval.update(prompts='paper', aggregate_tokens=32)
  return config
