"""RLMEC on kj_arith end to end: a trained generative reward model (GRM) vs SFT / RFT / DPO / GRPO /
RLMEC with the programmatic reward, at the same number of policy updates and sequences.

Stages (`config.stage`, run through the stage pipeline, per-seed folders `<workdir>/seed_<s>/`):
sft -> samples -> teacher (program; the first wrong step and the minimal rewrite of every sample);
the GRM's own data: grm_samples (the SFT policy's samples of OTHER problems) -> grm_teacher ->
grm_data (locate / rewrite / copy targets) -> grm (SFT from the SFT policy, model role `grm`);
grm_rewrite (the GRM judges the policy samples, compared with the program teacher: its locate
accuracy is on problems it never saw) -> rewards (GRM keep-probabilities) -> rlmec; baselines from
the same SFT policy and samples with the same updates, sequences per update and learning rate:
sft_more (SFT continued), rft, pairs -> dpo, grpo (online), prog_rewards -> rlmec_prog.

repro (2 CPU cores): the post-training comparison's SFT policy (configs/arith/posttrain.py, 0.84M
parameters, levels 1-2; its sampled accuracy on levels 1-2 is ~27%: room to improve and something
to keep), trained once (`<workdir>/shared/sft`) like the GRM (2000 problems x 4 samples, 800 steps
x 16 rows); per training seed (3 by default) 1000 problems x 4 samples at T=0.7, both teachers, the
rewards and every row (30 updates x 32 sequences at lr 1e-4; GRPO 4 prompts x 8), evaluated on
100 test problems per trained level, 4 sampling runs + greedy; the table's paired differences are
to `sft_more`. Measured 2026-12-07 (99 min of stage time on 2 cores shared with other experiments):
GRM locate accuracy 90.8 ± 0.6% on unseen problems; accuracy SFT 27.0, SFT continued 29.7 ± 0.5,
RFT 30.2 ± 1.3, RLMEC (GRM) 28.9 ± 1.1, RLMEC (programmatic) 28.1 ± 0.2, GRPO 26.9 ± 0.7, DPO
26.4 ± 0.5 (RLMEC 0.8 below continued SFT on every seed); experiments/rlmec/README.md has the table.
  python -m kuaijax.main --config=configs/rlmec/arith.py:repro --workdir=workdirs/rlmec_repro
gpu (one GPU, ~10 minutes, never run on a device): repro's SFT policy; a GRM trained on 8000 problems
for 3000 steps x 32; 4000 problems per seed; 100 updates x 64 sequences per row.
runlocal (2 CPU cores; a 0.2M-parameter policy, every stage at toy size: the pipeline runs, the
policy learns little):
  python -m kuaijax.main --config=configs/rlmec/arith.py:runlocal --workdir=workdirs/rlmec_arith
full scale (the paper's hyper-parameters on a ~76M model, levels 1-4 trained; not run):
  python -m kuaijax.main --config=configs/rlmec/arith.py --workdir=gs://.../rlmec_arith
Args: `stages=` the rows to run (their inputs are added), `seeds=0+1+2`; with repro / gpu:
`sft_from=<workdir>/shared/sft` (import a finished SFT policy), `sft_per_seed=True`.
"""

import ml_collections

from configs.arith import posttrain
from kuaijax.config_lib import (
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


def _grm_stages() -> dict:
  """The GRM's own training data (the SFT policy's samples of other problems, judged by the program
  teacher) -> the GRM (its own model role) -> its verdicts on the policy samples beside the program
  teacher's -> token rewards; and the programmatic rewards. The GRM never sees the problems it
  judges, so its locate accuracy is a held-out one."""
  teacher = dict(type='teacher', teacher='program', compare='', max_prompt_len=0, batch_size=128)
  rewards = dict(type='rewards', auc_data='teacher', batch_size=128, max_len=2048)
  return dict(
    teacher=CD(dict(teacher, data='samples')),
    grm_samples=posttrain.sample_stage(
      limit=8000, offset=8000, num_samples=5, temperature=0.7, top_p=0.95, batch_size=128
    ),
    grm_teacher=CD(dict(teacher, data='grm_samples')),
    grm_data=CD(dict(type='grm_data', data='grm_teacher')),
    grm=_train(
      'sft', 'GRM', 'grm_data', steps=3000, batch_size=32, lr=2e-5, evaluate=False, model='grm'
    ),
    grm_rewrite=CD(
      dict(teacher, data='samples', teacher='grm', compare='teacher', max_prompt_len=1024)
    ),
    rewards=CD(dict(rewards, data='grm_rewrite', grm='grm')),
    prog_rewards=CD(dict(rewards, data='teacher', grm='')),
  )


def _post_stages(post: int, bs: int, lr: float) -> dict:
  """The rows post-trained from the SFT policy: RLMEC (GRM / programmatic) and the baselines."""
  rlmec_loss = dict(eps=0.3, lam=1.0)
  common = dict(steps=post, batch_size=bs, lr=lr)
  rows = dict(
    rlmec=_train('rlmec', 'RLMEC (GRM)', 'rewards', **common, loss=rlmec_loss),
    rlmec_prog=_train('rlmec', 'RLMEC (programmatic)', 'prog_rewards', **common, loss=rlmec_loss),
    sft_more=_train('sft', 'SFT (continued)', 'task:train', **common),
    rft=_train('rft', 'RFT', 'samples', **common, options=dict(max_per_prompt=0, with_gold=False)),
    pairs=CD(dict(type='pairs', data='samples', max_pairs_per_prompt=2, gold_fallback=False)),
    dpo=_train(
      'dpo',
      'DPO',
      'pairs',
      **common,
      reference='sft',
      options=dict(reference='precomputed'),
      loss=dict(loss_type='sigmoid', beta=0.1, label_smoothing=0.0, simpo_gamma=0.5),
    ),
  )
  rows['grpo'] = _grpo(post, bs, lr)
  return rows


def _grpo(post: int, bs: int, lr: float) -> CD:
  """The post-training comparison's online GRPO block (exact-answer reward, group 8, no KL), with
  the rows' steps and learning rate: bs / 8 prompts x 8 samples = bs sequences per update."""
  block = posttrain.grpo_stage('exact_answer')
  block.label = 'GRPO (exact-answer reward)'
  block.train.update(_steps(post, bs // block.options.group_size))
  block.optimizer.update(lr=lr, warmup_steps=max(1, post // 30), min_lr_ratio=0.0)
  return block


def _stages() -> CD:
  s = CD()
  s.sft = _train('sft', 'SFT', 'task:train', steps=20_000, batch_size=32, lr=3e-4, init_from='')
  s.sft.optimizer.update(warmup_steps=500, weight_decay=0.1, min_lr_ratio=0.1)
  s.samples = posttrain.sample_stage(
    limit=8000, offset=0, num_samples=5, temperature=0.7, top_p=0.95, batch_size=128
  )
  s.update(_grm_stages())
  # paper: 3 epochs at lr 5e-6, 128 sequences per step
  s.update(_post_stages(post=1000, bs=128, lr=5e-6))
  return s


POST_ROWS = ('sft_more', 'rft', 'dpo', 'rlmec', 'rlmec_prog', 'grpo')
JUDGES = ('teacher', 'grm_teacher', 'grm_rewrite', 'rewards', 'prog_rewards')
GRM_STAGES = ('grm_samples', 'grm_teacher', 'grm_data', 'grm')


def _resize(config, *, grm, post, judge_batch, max_len) -> None:
  """Sizes in place: `grm` (steps, batch, lr) of the GRM, `post` (steps, sequences per step, lr) of
  every post-training row (GRPO: sequences / group_size prompts x group_size samples), the judging stages' batch and
  prompt (+ sample) width."""
  s = config.stage
  for name in JUDGES:
    s[name].batch_size = judge_batch
  s.grm_rewrite.max_prompt_len = max_len
  for name in ('rewards', 'prog_rewards'):
    s[name].max_len = max_len
  steps, batch_size, lr = grm
  s.grm.train.update(_steps(steps, batch_size))
  s.grm.optimizer.update(lr=lr, warmup_steps=max(1, steps // 30))
  steps, batch_size, lr = post
  for name in POST_ROWS:
    group = s[name].options.group_size if name == 'grpo' else 1
    s[name].train.update(_steps(steps, batch_size // group))
    s[name].optimizer.update(lr=lr, warmup_steps=max(1, steps // 10))


def _runlocal(config) -> None:
  """runlocal (2 CPU cores): a 0.2M-parameter policy, levels 1-2 trained, level 3 held out, every
  stage at toy size (the pipeline runs; the policy learns little)."""
  s = config.stage
  config.data.update(levels=(1, 2), seq_len=768, prompt_len=224, max_new_tokens=96)
  config.evals.arith.update(groups=(1, 2, 3), per_group=30, seeds=(0,), batch_size=90)
  config.models.policy.update(
    dtype='float32', d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=192
  )
  s.sft.train.update(_steps(300, 8))
  s.sft.optimizer.update(lr=3e-3, warmup_steps=10)
  s.samples.update(limit=48, num_samples=4, batch_size=48)
  s.grm_samples.update(limit=48, offset=48, num_samples=4, batch_size=48)
  _resize(config, grm=(120, 8, 2e-3), post=(20, 8, 5e-5), judge_batch=32, max_len=768)
  config.train.update(progress=False)


def _reproduction(arg, args) -> CD:
  """repro / gpu: the post-training comparison's SFT policy (configs/arith/posttrain.py, trained
  once and shared by the training seeds; its sampled accuracy on levels 1-2 is ~27%), a GRM trained
  once on that policy's samples of other problems, and per training seed: new samples, both
  teachers, the rewards and every post-training row, evaluated on the trained levels 1-2."""
  config = posttrain.comparison_config(arg, args, reference_row='sft_more')
  sft = config.stage.sft
  config.experiment = 'rlmec'
  config.stage = _stages()
  config.stage.sft = sft
  config.stages = args.stages.replace('+', ',')
  s = config.stage
  for name in GRM_STAGES:
    s[name].shared_seed = 0
  sampled = dict(num_samples=4, batch_size=60)
  if args.gpu:
    s.samples.update(limit=4000, offset=0, **sampled)
    s.grm_samples.update(limit=8000, offset=4000, **sampled)
    _resize(config, grm=(3000, 32, 1e-3), post=(100, 64, 1e-4), judge_batch=250, max_len=512)
  else:
    s.samples.update(limit=1000, offset=0, **sampled)
    s.grm_samples.update(limit=2000, offset=1000, **sampled)
    _resize(config, grm=(800, 16, 1e-3), post=(30, 32, 1e-4), judge_batch=100, max_len=512)
  posttrain.trained_levels_eval(config)
  config.train.update(progress=False)
  return config


def get_config(arg=None):
  args = parse_arg(
    arg,
    runlocal=False,
    repro=False,
    gpu=False,
    stages=ROWS,
    seeds='',
    sft_from='',
    sft_per_seed=False,
  )
  if args.repro or args.gpu:
    config = _reproduction(arg, args)
  else:
    if args.sft_from or args.sft_per_seed:
      raise ValueError(f'config arg {arg!r}: sft_from / sft_per_seed go with repro or gpu')
    config = trainer_config(progress=True)
    config.experiment = 'rlmec'
    config.seeds = parse_seeds(args.seeds or '0+1+2')  # training seeds: one pipeline each
    config.stages = args.stages.replace('+', ',')
    config.data = posttrain.arith_data(seq_len=2048)
    config.models = CD(
      dict(
        policy=lm_model(
          vocab_size=384, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, d_ff=2048
        )
      )
    )
    config.stage = _stages()
    config.evals = CD(dict(arith=posttrain.accuracy_eval(seeds=(0, 1, 2))))
    if args.runlocal:
      _runlocal(config)
  # The GRM is a model role of its own (the paper: the same architecture as the policy).
  config.models.grm = CD(config.models.policy.to_dict())
  return config
