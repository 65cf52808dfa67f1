"""PCformer vs ODE Transformer vs vanilla (and HARPE vs single-base RoPE) on kj_lm_mixture.

A pipeline (`kuaijax.stages`) of one 'pretrain' stage per variant: `config.models.<variant>` is the
base decoder with the variant's layer stack, `config.stage.<variant>` trains it into
`<workdir>/seed_<s>/<variant>/`, `config.stages` (config arg `stages=pc_rk2+harpe`, default all six)
picks them:
  vanilla        L layers, 1 block evaluation per layer
  ode_rk2_gated  ODE Transformer, gated RK2 (2 evaluations per layer), same parameters (+ gates)
  pc_rk2         PCformer, RK2 EMA predictor + multistep corrector (3 evaluations per layer)
  pc_rk4         PCformer, RK4 EMA predictor + multistep corrector (5 evaluations per layer)
  vanilla_deep   3L vanilla layers: the block evaluations per token of pc_rk2 (~equal compute)
  harpe          vanilla with HARPE per-head RoPE bases (ascending between rope_b_min and b_max)
Table 2 compares `vanilla` (single base) with `harpe` on needle retrieval at the training length
and beyond: the passkey evaluator in those two stages' `final_evals`. `seeds=0+1+2` trains every
variant per training seed (default 0).

runlocal (d_model 64, 2 layers, 200 steps of 16 x 128 tokens; recorded run, one training seed:
16 min 28 s wall on 2 CPU cores shared with other jobs (load average 14-17); validation loss
vanilla_deep 2.3288 < vanilla 2.4412 < harpe 2.4460 < pc_rk2 2.6248 < ode_rk2_gated 2.6798 < pc_rk4
2.7417, so the papers' ordering does not appear in this run; experiments/pcformer/README.md has the
tables):
  python -m kuaijax.main --config=configs/pcformer/lm.py:runlocal --workdir=/tmp/kj_pcformer
repro (6 layers, d_model 96, 800 steps, vanilla / pc_rk2 / vanilla at 3x steps, 3 training seeds;
43 min 14 s on 2 quiet CPU cores, 2026-12-07: pc_rk2 - vanilla = +0.0324 ± 0.0154 nats (worse on 3 of 3
seeds), vanilla_3x_steps - vanilla = -0.2508 ± 0.0079; experiments/pcformer/README.md):
  python -m kuaijax.main --config=configs/pcformer/lm.py:repro --workdir=/tmp/kj_pc_repro
gpu (the same comparison plus the ODE Transformer at d_model 256, 8 layers, batch 32, 4000 steps,
for ~10 minutes of one H100; not run yet):
  python -m kuaijax.main --config=configs/pcformer/lm.py:gpu --workdir=/tmp/kj_pc_gpu
full scale (mirrors the released PCformer LM: the Llama decoder of pcformer_lm/configuration_llama.py,
hidden 2048, 24 layers, 16 heads, FFN 5432, 2048 tokens, RK2 EMA predictor with alpha 0.5; one
variant per command on a v5p-64 / 64 x H100 pod, ~1.3B parameters, about a day per 100B tokens (an
estimate; not run):
  python -m kuaijax.main --config=configs/pcformer/lm.py:stages=pc_rk2 --workdir=gs://.../pc
Expected at full scale (the paper's ordering; not recorded here): validation loss pc_rk4 <= pc_rk2
< ode_rk2_gated < vanilla at equal parameters; vanilla_deep (3x parameters) is the equal-compute
reference.
"""

import ml_collections

from kuaijax.config_lib import (
  LM_MIXTURE_TASKS,
  data_section,
  lm_model,
  parse_arg,
  parse_seeds,
  pretrain_stage,
  trainer_config,
)

VARIANTS = ('vanilla', 'ode_rk2_gated', 'pc_rk2', 'pc_rk4', 'vanilla_deep', 'harpe')
# The reproduction setting (`repro` / `gpu`): the methods against vanilla at equal parameters, and
# vanilla trained for pc_rk2's block evaluations (3x the steps: about equal compute and wall time).
# The CPU setting leaves the ODE Transformer out (`stages=...+ode_rk2_gated` adds it) to fit 45 minutes.
REPRO_VARIANTS = ('vanilla', 'pc_rk2', 'vanilla_3x_steps')
GPU_VARIANTS = ('vanilla', 'ode_rk2_gated', 'pc_rk2', 'vanilla_3x_steps')
RETRIEVAL = ('vanilla', 'harpe')  # the variants scored on needle retrieval (table 2)


def _variants(layers: int, harpe: dict) -> dict[str, dict]:
  """Variant name -> overrides of the base model section."""
  return dict(
    vanilla=dict(stack='vanilla'),
    ode_rk2_gated=dict(stack='ode_rk2_gated'),
    pc_rk2=dict(stack='pc_rk2', pc_alpha='scalar'),
    pc_rk4=dict(stack='pc_rk4', pc_alpha='scalar'),
    vanilla_deep=dict(stack='vanilla', num_layers=3 * layers),
    harpe=dict(stack='vanilla', **harpe),
    vanilla_3x_steps=dict(stack='vanilla'),
  )


def _retrieval(seq_len: int) -> dict:
  """The passkey evaluator at half, one, two and four times the training length."""
  return dict(
    type='passkey',
    context_lengths=(seq_len // 2, seq_len, 2 * seq_len, 4 * seq_len),
    depths=(0.0, 0.5, 1.0),
    per_depth=8,
    batch_size=8,
    template='recall',
    seed=0,
  )


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, repro=False, gpu=False, stages='', seeds='')
  if args.runlocal + args.repro + args.gpu > 1:
    raise ValueError(f'config arg {arg!r}: runlocal, repro and gpu are alternatives; pick one')
  reproduction = args.repro or args.gpu
  default_stages = GPU_VARIANTS if args.gpu else REPRO_VARIANTS if args.repro else VARIANTS
  args.stages = args.stages or '+'.join(default_stages)
  args.seeds = args.seeds or ('0+1+2' if reproduction else '0')
  config = trainer_config()
  config.experiment = 'pcformer'
  config.seeds = parse_seeds(args.seeds)
  config.data = data_section(
    name='kj_lm_mixture',
    task_names=LM_MIXTURE_TASKS,
    tokenizer='sentencepiece',
    spm_vocab_size=32000,
    seq_len=2048,
  )
  # As released: RMSNorms (block, final) use eps 1e-6, the PC LayerNorms (per RK stage, predictor,
  # corrector) 1e-5.
  model = lm_model(
    vocab_size=32000,
    d_model=2048,
    num_layers=24,
    num_heads=16,
    num_kv_heads=16,
    d_ff=5432,
    tie_embeddings=False,
    remat='full',
    norm_eps=1e-6,
    pc_norm_eps=1e-5,
  )
  config.train.update(
    steps=50_000, batch_size=512, log_every=100, eval_every=2000, checkpoint_every=2000
  )
  config.optimizer.update(lr=3e-4, warmup_steps=2000)
  harpe = dict(rope_heads='ascending', rope_b_min=1e4, rope_b_max=1e6)
  if args.runlocal:
    config.data.update(
      tokenizer='byte', seq_len=128, eval_batch_size=16, eval_batches=4, spm_vocab_size=8192
    )
    model.update(
      vocab_size=384,
      d_model=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=4,
      d_ff=192,
      tie_embeddings=True,
      dtype='float32',
      remat='none',
    )
    config.train.update(
      steps=200, batch_size=16, log_every=25, eval_every=200, checkpoint_every=200
    )
    config.optimizer.update(lr=3e-3, warmup_steps=20)
    harpe = dict(rope_heads='ascending', rope_b_min=1e3, rope_b_max=1e5)
  if reproduction:
    # Deep enough for the multistep corrector to have a history (6 layers; 8 on a GPU), trained
    # past the early phase (1.6M tokens on CPU, 16M on one H100).
    config.data.update(tokenizer='byte', seq_len=128, eval_batch_size=16, eval_batches=8)
    model.update(
      vocab_size=384,
      d_model=256 if args.gpu else 96,
      num_layers=8 if args.gpu else 6,
      num_heads=4,
      num_kv_heads=4,
      d_ff=768 if args.gpu else 288,
      tie_embeddings=True,
      dtype='float32',
      remat='none',
    )
    steps = 4000 if args.gpu else 800
    config.train.update(
      steps=steps,
      batch_size=32 if args.gpu else 16,
      log_every=50,
      eval_every=steps,
      checkpoint_every=steps,
    )
    config.optimizer.update(lr=2e-3, warmup_steps=50)
  variants = _variants(model.num_layers, harpe)
  config.models = ml_collections.ConfigDict(
    {name: {**model.to_dict(), **overrides} for name, overrides in variants.items()}
  )
  retrieval = _retrieval(config.data.seq_len)
  config.stage = ml_collections.ConfigDict(
    {
      name: pretrain_stage(name, final_evals={'retrieval': retrieval} if name in RETRIEVAL else {})
      for name in variants
    }
  )
  # 3x the shared steps, also when `--config.train.steps` is overridden (references, not copies).
  config.stage.vanilla_3x_steps.train = ml_collections.ConfigDict(
    {key: config.train.get_ref(key) * 3 for key in ('steps', 'eval_every', 'checkpoint_every')}
  )
  if reproduction:  # the loss table is the comparison; no retrieval evaluation
    for name in RETRIEVAL:
      config.stage[name].final_evals = ml_collections.ConfigDict()
  config.stages = args.stages.replace('+', ',')
  config.evals = ml_collections.ConfigDict(dict(lm=dict(type='lm_loss')))
  return config
