"""Self-Agreement vs Self-Consistency / USC / greedy CoT on a toy model (kj_arith + a word task).

Stage pipeline (`kuaijax.stages`): `toy_data` (type sa_toy_data, shared by all seeds) writes the
toy SFT data set (kj_arith with and without the answer trigger, a word task, SA / USC aggregation
examples built only from training problems); `sft` (type train, method sft) trains a small
byte-level model on it, once per training seed in `<workdir>/seed_<s>/`; the evaluator
'self_agreement' then measures accuracy vs k paths on held-out test questions for greedy, SC, USC
and SA, over its sampling seeds, in the 'trigger' and the 'mixed' (no trigger) scenario
(experiments/self_agreement/README.md has the method notes and our numbers).

runlocal (4 layers, d=128, 300 steps; recorded before the stage pipeline, one training seed, ± over
5 sampling seeds; 2 CPU cores shared with ~8 other jobs (load average 13-22): 549 CPU-s, 71 min
wall; the toy stays weak: greedy 8.3% on the trigger scenario, SC / USC / SA 0-4% at every k, so
the paper's claims are neither confirmed nor refuted; details in
experiments/self_agreement/README.md):
  python -m kuaijax.main --config=configs/self_agreement/toy.py:runlocal --workdir=workdirs/self_agreement
repro (2 CPU cores, 3 training seeds): the runlocal model trained 700 steps x 8 x 1024 tokens on
4000 problems (two formats), 1000 word questions and 1000 + 1000 aggregation sets; 50 test problems
per level, 50 word questions, 3 sampling seeds. Measured 2026-12-07: greedy 16.3 ± 9.1% (trigger;
seeds 20 / 23 / 6%), SC 13.3 -> 16.0% from k=1 to 20, SA and USC flat at ~13%; ~26 min per seed
alone on 2 cores (experiments/self_agreement/README.md has the table):
  python -m kuaijax.main --config=configs/self_agreement/toy.py:repro --workdir=workdirs/sa_repro
gpu (one GPU, ~10 minutes; never run on a device): d_model 256, 6 layers, the full toy data, 3000
steps x 32, 5 sampling seeds:
  python -m kuaijax.main --config=configs/self_agreement/toy.py:gpu --workdir=workdirs/sa_gpu
full (one accelerator host; larger model, more steps and problems; not run yet):
  python -m kuaijax.main --config=configs/self_agreement/toy.py --workdir=workdirs/self_agreement_full
A pretrained causal LM (a Hugging Face folder: config.json, safetensors, tokenizer.json) instead of
the toy: `hf=<folder>` evaluates it as it is (stage `pretrained`, type params: no SFT; the paper's
SA / USC instructions, whole solutions in the aggregation prompts); `hf=<folder>,stages=sft`
fine-tunes it on the toy data first (`--config.stage.sft.train.steps=N`):
  python -m kuaijax.main --config=configs/self_agreement/toy.py:hf=/models/Qwen2.5-0.5B \
    --workdir=workdirs/self_agreement_qwen
Args: `seeds=0+1+2` the training seeds (default 0; repro / gpu: 0+1+2), `stages=` the stages to run.
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


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, repro=False, gpu=False, hf='', stages='', seeds='')
  if args.runlocal + args.repro + args.gpu > 1:
    raise ValueError(f'config arg {arg!r}: runlocal, repro and gpu are alternatives; pick one')
  config = trainer_config()
  config.experiment = 'self_agreement'
  config.seeds = parse_seeds(args.seeds or ('0+1+2' if args.repro or args.gpu else '0'))
  config.data = data_section(
    task='',  # the toy data comes from the toy_data stage, the questions from the evaluator
    tokenizer='hf' if args.hf else 'byte',
    seq_len=1024,  # packed rows; a k=20 aggregation example is ~800 byte tokens
    prompt_len=1024,  # (unused: the evaluator pads prompts to their own width)
    max_new_tokens=80,
  )
  if args.hf:  # the folder's architecture; float32 as the toy
    config.models = CD(dict(policy=CD(dict(hf=args.hf, dtype='float32'))))
  else:
    config.models = CD(dict(policy=_toy_model()))
  config.stage = _stages(args.hf)
  config.stages = args.stages or ('pretrained' if args.hf else 'sft')
  config.evals = CD(dict(self_agreement=_evaluator(paper=bool(args.hf))))
  config.train.update(progress=True)
  if args.runlocal:
    _runlocal(config)
  if args.repro or args.gpu:
    _reproduction(config, gpu=args.gpu)
  return config


def _toy_model():
  return lm_model(
    vocab_size=259,
    d_model=384,
    num_layers=8,
    num_heads=6,
    num_kv_heads=2,
    d_ff=1024,
    dtype='float32',
  )


def _stages(hf: str) -> CD:
  stage = CD()
  stage.toy_data = CD(
    dict(
      type='sa_toy_data',
      levels=(1, 2),  # kj_arith training levels
      limit=4000,  # kj_arith train problems (each in the trigger and no-trigger format)
      word_examples=2000,  # word-task training questions
      sets=6000,  # SA and USC aggregation examples (each)
      k_choices=(1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20),
      seed=1,
    )
  )
  stage.sft = train_stage(
    'sft',
    'SFT',
    data='toy_data',
    steps=6000,
    batch_size=16,
    optimizer=dict(lr=1e-3, warmup_steps=200),
    logs=60,
    checkpoints=6,
  )
  if hf:  # the imported model evaluated as it is
    stage.pretrained = CD(dict(type='params', label='imported', model='policy'))
  return stage


def _evaluator(paper: bool) -> CD:
  return CD(
    dict(
      type='self_agreement',
      scenarios=('trigger', 'mixed'),
      levels=(1, 2),
      problems_per_level=100,
      word_questions=100,
      train_word_examples=2000,  # = stage.toy_data.word_examples: those questions are left out
      ks=(1, 3, 5, 10, 20),
      seeds=(0, 1, 2, 3, 4),  # sampling seeds
      temperature=0.7,
      top_k=40,  # 0: off
      max_new_tokens=80,
      # 'toy': short instructions and one line per solution (what the toy SFT taught); 'paper':
      # the paper's SA / USC instructions and whole solutions (pretrained models).
      prompts='paper' if paper else 'toy',
      aggregate_tokens=32 if paper else 8,  # reply budget of the SA call (USC: half of it)
      prefix='sa',
    )
  )


def _runlocal(config):
  config.stage.toy_data.update(limit=1200, word_examples=500, sets=2000)
  config.evals.self_agreement.update(
    train_word_examples=500, problems_per_level=12, word_questions=12, max_new_tokens=64
  )
  if not config.models.policy.get('hf'):
    config.models.policy.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384)
  config.stage.sft.train.update(steps=300, batch_size=4, log_every=20, checkpoint_every=300)
  config.stage.sft.optimizer.update(lr=3e-3, warmup_steps=30)


def _reproduction(config, *, gpu: bool) -> None:
  """repro (2 CPU cores) / gpu (one GPU): the runlocal model trained long enough to solve some
  held-out problems and to aggregate (the arithmetic seen about as often as by the post-training
  comparison's SFT policy, ~27% sampled on levels 1-2), 3 training seeds, 50 test problems per
  level, 50 word questions, 3 sampling seeds."""
  _runlocal(config)
  config.stage.toy_data.update(limit=4000, word_examples=1000, sets=1000)
  config.evals.self_agreement.update(
    train_word_examples=1000, problems_per_level=50, word_questions=50, seeds=(0, 1, 2)
  )
  steps, batch_size = (3000, 32) if gpu else (700, 8)
  if gpu:  # a wider, deeper model on the full toy data
    config.stage.toy_data.update(limit=0, word_examples=2000, sets=6000)
    config.evals.self_agreement.update(train_word_examples=2000, seeds=(0, 1, 2, 3, 4))
    config.models.policy.update(d_model=256, num_layers=6, num_heads=4, num_kv_heads=2, d_ff=768)
  config.stage.sft.train.update(stage_steps(steps, batch_size))
  config.stage.sft.optimizer.update(lr=3e-3 if not gpu else 1e-3, warmup_steps=30)
  config.train.update(progress=False)
