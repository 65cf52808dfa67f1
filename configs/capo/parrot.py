"""Parrot / CaPO on kj_dialog: Parrot-Ask sessions, SFT on short vs long sessions, CaPO by negative kind.

Stages (`kuaijax.stages`; methods in `kuaijax.methods.parrot`, stage types in `kuaijax.stages.parrot`):
  ask           Parrot-Ask: chat_sft with the loss on user queries only, on kj_dialog train sessions
  sessions      the ask model writes queries, the kj_dialog program answers (stands in for ChatGPT)
  sft_short     chat_sft on the first 1-2 turns of kj_dialog train sessions (the turn-count ablation)
  sft_long      chat_sft on the Parrot-Ask sessions (every assistant turn scored)
  pairs_<kind>  context-aware pairs from the Parrot-Ask sessions (neglect, hallucination,
                misunderstanding, all = the three together)
  capo_<kind>   CaPO (sigmoid DPO, beta 0.1, final answer scored) from sft_long, sft_long the reference
Every policy is evaluated on kj_dialog-8 (own history, exact match per turn, context sensitivity)
and on held-out CaPO pairs of each negative kind (`kj_dialog_pairs`, validation sessions: how often
the policy's answer log-prob prefers the chosen answer, and its implicit reward against sft_long,
which therefore runs before the other policies); `experiments/capo.py` runs the pipeline once per
seed and writes the tables and plots.

runlocal (2 CPU cores; a ~0.1M-parameter byte-level model; the ask model is too weak at this size to
write well-formed queries, so sft_long and the pairs use the kj_dialog train sessions instead of the
Parrot-Ask ones): 16 min 54 s wall for 3 training seeds with the kj_dialog_pairs evaluation (32
validation sessions) on 2 CPU cores shared with the test suite (2026-12-07); every policy reaches 0%
exact match on kj_dialog-8 at this size, but on held-out pairs CaPO (neglect) moves the implicit
reward to prefer the chosen answer on 92.4 ± 4.0% of neglect pairs, while CaPO on hallucination /
misunderstanding stays at chance on its own kind (± over 3 training seeds; tables and what they
show in experiments/capo/README.md):
  python -m kuaijax.main --config=configs/capo/parrot.py:runlocal --workdir=workdirs/capo
repro (2 CPU cores; a 0.8M policy, both SFTs 600 steps of 8 x 512 tokens on the whole train split,
CaPO 100 x 16 pairs from 400 sessions; 40 test / 64 pair sessions). Measured on seed 0 only
(2026-12-07, 886 s for sft_long on shared cores): SFT-short 52.5% of first turns exact (headroom),
SFT-long 0% (1.3% of all turns: each session one unpacked row, 39% cut at 512 tokens), so CaPO's
starting policy still has no accuracy headroom at this budget; experiments/capo/README.md:
  python -m kuaijax.main --config=configs/capo/parrot.py:repro --workdir=workdirs/capo_repro
gpu (one GPU, ~10 minutes; never run on a device): d256 x 6, 4000 x 32 SFT steps, 768-token rows,
250 test and pair sessions:
  python -m kuaijax.main --config=configs/capo/parrot.py:gpu --workdir=workdirs/capo_gpu
full scale (one GPU host; ~25M parameters; not run yet):
  python -m kuaijax.main --config=configs/capo/parrot.py --workdir=workdirs/capo_full
Args: `seeds=0+1+2` (training seeds, one pipeline each), `kinds=neglect+hallucination+misunderstanding+all`
(the CaPO rows; `none` runs no CaPO stage), `stages=sft_short` (run only these stages and those they
need, instead of the rows `kinds` implies; without sft_long before them, their implicit-reward
metrics are left out).
"""

import functools

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
from kuaijax.data.dialog import NEGATIVE_KINDS

CD = ml_collections.ConfigDict
KIND_ROWS = (*NEGATIVE_KINDS, 'all')
CAPO_BETA = 0.1
REPRO_SFT_STEPS = 600


# One log line in 10 and a single checkpoint per stage (the stages are short).
_steps = functools.partial(stage_steps, logs=10, checkpoints=1)
_train = functools.partial(train_stage, logs=10, checkpoints=1)


def _chat_sft(label: str, data: str, **options) -> CD:
  return _train(
    'chat_sft',
    label,
    data=data,
    steps=5000,
    batch_size=32,
    optimizer=dict(lr=3e-4, warmup_steps=200),
    options=options,
  )


def _stages() -> CD:
  """Parrot-Ask, its sessions, the two SFT rows, and pairs + CaPO per negative kind."""
  stage = CD()
  stage.ask = _chat_sft('Parrot-Ask', 'task:train', loss_on='user', max_turns=0)
  stage.sessions = CD(
    dict(
      type='ask_sessions',
      policy='ask',
      data='task:train',  # Parrot-Ask continues real first questions: the first turn of these
      opening_turns=1,
      num_sessions=2000,
      num_turns=10,
      temperature=1.0,
      max_new_tokens=48,
      batch_size=256,
    )
  )
  stage.sft_short = _chat_sft(
    'SFT, short sessions (1-2 turns)', 'task:train', loss_on='assistant', max_turns=2
  )
  stage.sft_long = _chat_sft('SFT, long sessions', 'sessions', loss_on='assistant', max_turns=0)
  capo_opt = dict(lr=1e-5, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.0)  # the paper's lr
  for kind in KIND_ROWS:
    kinds = NEGATIVE_KINDS if kind == 'all' else (kind,)
    stage[f'pairs_{kind}'] = CD(dict(type='capo_pairs', data='sessions', kinds=kinds, limit=0))
    stage[f'capo_{kind}'] = _train(
      'chat_capo',
      f'+ CaPO ({kind})',
      data=f'pairs_{kind}',
      init_from='sft_long',
      reference='sft_long',
      steps=1000,
      batch_size=32,
      optimizer=capo_opt,
      options=dict(reference='precomputed'),
      loss=dict(beta=CAPO_BETA, label_smoothing=0.0),
    )
  return stage


def _runlocal(config) -> None:
  """Sized for 2 shared CPU cores: a byte-level model of ~0.1M parameters, a few dozen steps per
  stage; expect little beyond the answer format to be learnt (see the README's table)."""
  stage = config.stage
  config.data.update(seq_len=512, prompt_len=488, max_new_tokens=24, limit=600)
  config.models.policy.update(
    d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=192, dtype='float32'
  )
  for name in ('ask', 'sft_short', 'sft_long'):
    stage[name].train.update(_steps(60, 8))
    stage[name].optimizer.update(lr=3e-3, warmup_steps=5)
  stage.sessions.update(num_sessions=32, max_new_tokens=24, batch_size=32)
  for kind in KIND_ROWS:
    stage[f'capo_{kind}'].train.update(_steps(20, 8))
    stage[f'capo_{kind}'].optimizer.update(lr=1e-4, warmup_steps=2)
    stage[f'pairs_{kind}'].limit = 32
  config.evals.kj_dialog8.update(sessions=8, batch_size=8)
  config.evals.kj_dialog_pairs.update(sessions=32, batch_size=32)
  # At this size the ask model writes no well-formed query yet (0% in our runs), so the long-session
  # SFT and the CaPO pairs use the kj_dialog train sessions themselves (8-12 turns); the ask model
  # and its sessions still run for their statistics.
  stage.sft_long.data = 'task:train'
  for kind in KIND_ROWS:
    stage[f'pairs_{kind}'].data = 'task:train'


def _reproduction(config, *, gpu: bool) -> None:
  """repro (2 CPU cores) / gpu (one GPU): a model trained long enough on the whole kj_dialog train
  split to answer some held-out first turns (the headroom: something to fix and something to keep),
  then CaPO with enough pairs and updates to move it. The runlocal fallback to the kj_dialog train
  sessions for sft_long and the pairs is kept unless the ask model writes well-formed queries."""
  stage = config.stage
  config.data.update(limit=0)
  d_model = 256 if gpu else 128
  config.models.policy.update(d_model=d_model, num_layers=6 if gpu else 4, d_ff=3 * d_model)
  sft_steps, batch = (4000, 32) if gpu else (REPRO_SFT_STEPS, 8)
  if gpu:  # whole 8-12 turn sessions: at 512 tokens 39% of them lose their first turns
    config.data.update(seq_len=768, prompt_len=704)
  for name in ('sft_short', 'sft_long'):
    stage[name].train.update(_steps(sft_steps, batch))
    stage[name].optimizer.update(lr=3e-3 if not gpu else 1e-3, warmup_steps=50)
  stage.ask.train.update(_steps(sft_steps // 4, batch))  # only for the Parrot-Ask statistics
  stage.sessions.update(num_sessions=64)
  for kind in KIND_ROWS:
    stage[f'capo_{kind}'].train.update(_steps(100, 16))
    stage[f'capo_{kind}'].optimizer.update(lr=1e-4, warmup_steps=10)
    stage[f'pairs_{kind}'].limit = 400
  config.evals.kj_dialog8.update(sessions=250 if gpu else 40, batch_size=40)
  config.evals.kj_dialog_pairs.update(sessions=250 if gpu else 64, batch_size=32)


def get_config(arg=None):
  args = parse_arg(
    arg,
    runlocal=False,
    repro=False,
    gpu=False,
    seeds='0+1+2',
    kinds='neglect+hallucination+misunderstanding+all',
    stages='',
  )
  kinds = [k for k in args.kinds.replace(',', '+').split('+') if k and k != 'none']
  bad = sorted(set(kinds) - set(KIND_ROWS))
  if bad:
    raise ValueError(f'kinds: {bad} not in {KIND_ROWS} (or none)')
  config = trainer_config(progress=False)
  config.experiment = 'capo'
  config.seeds = parse_seeds(args.seeds)  # training seeds: one pipeline each, seed_<s>/
  config.data = data_section(
    task='kj_dialog',
    tokenizer='byte',
    limit=0,  # training sessions (0: the whole split)
    seq_len=640,  # an 8-turn session needs ~450 byte tokens; longer ones lose their oldest turns
    prompt_len=576,
    max_new_tokens=48,
  )
  policy = lm_model(
    vocab_size=384, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, d_ff=1536
  )
  config.models = CD(dict(policy=policy))
  config.stage = _stages()
  # '' (the default): both SFT rows and the CaPO rows of `kinds`; sft_long first, so that every
  # later policy is evaluated against it (the kj_dialog_pairs reference).
  config.stages = args.stages or '+'.join(['sft_long', 'sft_short', *(f'capo_{k}' for k in kinds)])
  kj_dialog8 = dict(type='kj_dialog8', split='test', sessions=250, num_turns=8, history='own')
  pairs = dict(
    type='kj_dialog_pairs',
    split='validation',  # held out: CaPO pairs come from train sessions, kj_dialog-8 from test
    sessions=250,
    kinds=NEGATIVE_KINDS,
    reference='sft_long',
    beta=CAPO_BETA,
    batch_size=64,
  )
  config.evals = CD(
    dict(kj_dialog8=CD(dict(kj_dialog8, batch_size=128)), kj_dialog_pairs=CD(pairs))
  )
  if args.runlocal + args.repro + args.gpu > 1:
    raise ValueError(f'config arg {arg!r}: runlocal, repro and gpu are alternatives; pick one')
  if args.runlocal or args.repro or args.gpu:
    _runlocal(config)
    if args.repro or args.gpu:
      _reproduction(config, gpu=args.gpu)
    if not args.stages:
      config.stages = 'sessions+' + config.stages
  return config
