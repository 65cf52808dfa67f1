"""Dense / Dense-wide / Top-1 / Top-2 / Top-P MoE decoders on one token budget (arXiv 2403.07652).

A pipeline (`kuaijax.stages`) of one 'pretrain' stage per variant: `config.models.<variant>` is the
variant's decoder (the MoE options merged in), `config.stage.<variant>` trains it, `config.stages`
lists them ('dense,dense_wide,top1,top2,topp'; `--config.stages=topp` trains one). Every variant of
a training seed starts from the same init seed and sees the same batches; the MoE auxiliary losses
(balance 1e-2, router entropy 1e-4, averaged over layers) are each stage's `aux_loss`. The shared
setup (data, base model, optimizer, evaluators) is `moe_lm` below (scaling shares it).

Args: `runlocal` (laptop size on the embedded kj_lm_mixture), `repro` / `gpu` (the reproduction
setting below), `suite=table|p_sweep|ablation` (the paper's comparison; Top-P at p = 0.1 .. 0.7 next
to Top-2; Top-P without the dynamic (entropy) loss, and with its kept weights renormalised as
Top-2's are) and `seeds=0+1+2` (training seeds;
default 0+1+2 for the repro / gpu table, else 0).

repro (designed before the comparison: the runlocal decoder, 4 layers x 96 with 8 experts of width
192, trained 1200 steps x 16 x 128 = 2.46M tokens per variant, past the phase where Top-P's router
still buys experts; dense / Top-2 / Top-P, 3 training seeds; Top-P minus Top-2 paired over seeds.
Measured 2026-12-07 on 2 CPU cores: 29 min 53 s wall (about 26 min quiet); Top-P mean k 3.22 ->
1.71 ± 0.07, 0.91x Top-2's active parameters, loss Top-P - Top-2 = +0.033 ± 0.019 (worse on 3 of 3
seeds), dense - Top-2 = +0.040 ± 0.016; experiments/topp_moe/README.md has the tables):
  python -m kuaijax.main --config=configs/topp_moe/compare.py:repro --workdir=/tmp/kj_topp_repro
p sweep and ablations at seed 0 (46 and 19 min wall with other jobs running; Top-P never reaches
Top-2 below 1.5x its active parameters; renormalised weights recover 0.022 of the 0.054 gap; no
dynamic loss: +0.004, mean k unchanged):
  python -m kuaijax.main --config=configs/topp_moe/compare.py:repro,suite=p_sweep \
    --workdir=/tmp/kj_topp_repro_sweep
  python -m kuaijax.main --config=configs/topp_moe/compare.py:repro,suite=ablation \
    --workdir=/tmp/kj_topp_repro_ablation
gpu (the same comparison on one H100, about 10 minutes for the table: 8 layers x 256, 16 experts
of width 704, 2000 steps x 32 x 256 = 16.4M tokens per variant; sized, not yet run on a device):
  python -m kuaijax.main --config=configs/topp_moe/compare.py:gpu --workdir=/tmp/kj_topp_gpu

runlocal comparison (2 CPU cores shared by other jobs, load 14-16: 41 min wall; the table shows
validation loss and experts per token per task, mean / max experts per layer, the Spearman rank
correlation of token loss vs experts selected per layer and task, and the activated parameters vs
Top-2; recorded 2026-11-30 with uncapped Top-P, one training seed: validation loss Top-2 1.871,
Top-P 2.106 with 2.27 experts per token (max 3), mean k 3.10 -> 2.22 during training, loss/experts
rho 0.12 - 0.30 per layer over all tokens; experiments/topp_moe/README.md has the tables):
  python -m kuaijax.main --config=configs/topp_moe/compare.py:runlocal --workdir=/tmp/kj_topp_moe
runlocal p sweep (Top-2 and seven Top-P variants; not timed, roughly 2.5x the comparison):
  python -m kuaijax.main --config=configs/topp_moe/compare.py:runlocal,suite=p_sweep \
    --workdir=/tmp/kj_topp_sweep
full scale, the paper's setup (LLaMA-style 24 x 1024, 16 heads x 64, vocab 32000, 16 experts of
width 2816 in every layer, p = 0.4, init std 0.006, AdamW (0.9, 0.95) wd 0.1, cosine 3e-4 -> 3e-5
with 2000 warm-up steps, 2048 sequences of 2048 tokens per step, 100B tokens = 23842 steps; a TPU
pod slice or GPU cluster, e.g. --config.parallel.mesh.expert=8 --config.train.grad_accum=8; not
recorded):
  python -m kuaijax.main --config=configs/topp_moe/compare.py --workdir=gs://.../topp_moe \
    --config.data.name='jsonl:/data/redpajama/{split}.jsonl' --config.stages=topp
The corpus is any prepared tfds name (array_record in data.data_dir) or local jsonl files with a
'text' field ('{split}' is replaced by train / validation), read by the same grain pipeline; the
SentencePiece tokenizer (32000) is trained once into <workdir>/shared/ unless data.spm_model_path
names one (e.g. the LLaMA tokenizer.model). Paper numbers per variant:
experiments/topp_moe/README.md.
"""

import ml_collections

from kuaijax.config_lib import (
  check_choice,
  data_section,
  lm_model,
  moe_aux_loss,
  moe_model,
  moe_routings,
  parse_arg,
  parse_seeds,
  pretrain_stage,
  trainer_config,
)

CD = ml_collections.ConfigDict

SWEEP_P = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


# The reproduction table (`repro` / `gpu`): Top-P against Top-2 at its active-parameter ratio, and
# dense (Top-1's active parameters) to show what the experts add at all.
REPRO_TABLE = ('dense', 'top2', 'topp')
NO_ENTROPY = 'topp_no_entropy'  # suite=ablation: Top-P trained without the dynamic loss


def variants(suite: str, *, wide: dict, reproduction: bool = False) -> dict[str, dict]:
  """Variant name -> overrides of the base model section, in run order."""
  routing = moe_routings(p=0.4)
  if suite == 'table':
    if reproduction:
      return {name: routing[name] for name in REPRO_TABLE}
    # Dense-wide: 1.25x the width (the paper's Dense-570M).
    return {
      'dense': routing['dense'],
      'dense_wide': dict(mlp='swiglu', **wide),
      **{name: routing[name] for name in ('top1', 'top2', 'topp')},
    }
  if suite == 'ablation':
    # Renormalised: the kept weights sum to 1 as Top-2's do (the paper keeps raw probabilities).
    renormalized = dict(
      routing['topp'], mlp_options=dict(routing['topp']['mlp_options'], renormalize=True)
    )
    return {'topp': routing['topp'], NO_ENTROPY: routing['topp'], 'topp_renormalized': renormalized}
  sweep = {f'topp_p{round(p * 10):02d}': moe_routings(p=p)['topp'] for p in SWEEP_P}
  return {'top2': routing['top2'], **sweep}


def reproduction_setting(config, model: dict, moe_layer: dict, *, gpu: bool) -> None:
  """The repro (2 CPU cores, <= 45 minutes for the table) / gpu (one H100, ~10 minutes) sizes, in
  place: enough tokens per variant that the Top-P router's expert count settles (2.46M on CPU,
  16.4M on a GPU), evaluated on 8 batches for the token-level correlations."""
  config.data.update(eval_batch_size=32, eval_batches=8)
  if gpu:
    config.data.seq_len = 256
    model.update(d_model=256, num_layers=8, num_heads=8, num_kv_heads=4, d_ff=704)
    moe_layer.update(num_experts=16, expert_d_ff=704)
  steps = 2000 if gpu else 1200
  config.train.update(
    steps=steps,
    batch_size=32 if gpu else 16,
    log_every=50,
    eval_every=steps // 6,
    checkpoint_every=steps // 2,
  )
  config.optimizer.update(lr=3e-3, min_lr_ratio=0.1, warmup_steps=100)


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, repro=False, gpu=False, suite='table', seeds='')
  check_choice('suite', args.suite, ('table', 'p_sweep', 'ablation'))
  if args.runlocal + args.repro + args.gpu > 1:
    raise ValueError(f'config arg {arg!r}: runlocal, repro and gpu are alternatives; pick one')
  reproduction = args.repro or args.gpu
  config, model, moe_layer = moe_lm(args.runlocal or reproduction)
  if reproduction:
    reproduction_setting(config, model, moe_layer, gpu=args.gpu)
  config.experiment = 'topp_moe'
  multi_seed = reproduction and args.suite == 'table'
  config.seeds = parse_seeds(args.seeds or ('0+1+2' if multi_seed else '0'))
  # Dense-570M of the paper: hidden 1280 (20 heads x 64); d_ff 3584 gives its 570M parameters.
  # runlocal scales width the same way (x1.25).
  wide = dict(d_model=1280, num_heads=20, num_kv_heads=20, d_ff=3584)
  if args.runlocal:
    wide = dict(d_model=120, num_heads=5, num_kv_heads=5, d_ff=240)
  chosen = variants(args.suite, wide=wide, reproduction=reproduction)
  config.models = ml_collections.ConfigDict(
    {name: moe_model(model, v, moe_layer, name=f'variant {name}') for name, v in chosen.items()}
  )
  config.stage = ml_collections.ConfigDict(
    {
      name: pretrain_stage(
        name, aux_loss=moe_aux_loss(entropy_weight=0.0) if name == NO_ENTROPY else moe_aux_loss()
      )
      for name in chosen
    }
  )
  config.stages = ','.join(chosen)
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
  config.data = data_section(
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
