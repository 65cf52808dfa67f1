"""Dense / Dense-wide / Top-1 / Top-2 / Top-P MoE decoders on one token budget (arXiv 2403.07652).

A pipeline (`kuaijax.stages`) of one 'pretrain' stage per variant: `config.models.<variant>` is the
variant's decoder (the MoE options merged in), `config.stage.<variant>` trains it, `config.stages`
lists them ('dense,dense_wide,top1,top2,topp'; `--config.stages=topp` trains one). Every variant of
a training seed starts from the same init seed and sees the same batches; the MoE auxiliary losses
(balance 1e-2, router entropy 1e-4, averaged over layers) are each stage's `aux_loss`. The shared
setup (data, base model, optimizer, evaluators) is `kuaijax.lm_configs.moe_lm`.

Args: `runlocal` (laptop size on the embedded kj_lm_mixture), `suite=table|p_sweep` (the paper's
comparison, or Top-P at p = 0.1 .. 0.7 next to Top-2) and `seeds=0+1+2` (training seeds; default 0).

runlocal comparison (2 CPU cores shared by other jobs, load 14-16: 41 min wall; the table shows
validation loss and experts per token per task, mean / max experts per layer, the Spearman rank
correlation of token loss vs experts selected per layer and task, and the activated parameters vs
Top-2; recorded 2026-11-30 with uncapped Top-P: validation loss Top-2 1.871, Top-P 2.106 with 2.27
experts per token (max 3), mean k 3.10 -> 2.22 during training, loss/experts rho 0.12 - 0.30 per
layer; experiments/topp_moe/README.md has the tables):
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

from kuaijax import lm_configs
from kuaijax.config_lib import (
  check_choice,
  moe_aux_loss,
  moe_model,
  moe_routings,
  parse_arg,
  parse_seeds,
  pretrain_stage,
)

SWEEP_P = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def variants(suite: str, *, wide: dict) -> dict[str, dict]:
  """Variant name -> overrides of the base model section, in run order."""
  routing = moe_routings(p=0.4)
  if suite == 'table':
    # Dense-wide: 1.25x the width (the paper's Dense-570M).
    return {
      'dense': routing['dense'],
      'dense_wide': dict(mlp='swiglu', **wide),
      **{name: routing[name] for name in ('top1', 'top2', 'topp')},
    }
  sweep = {f'topp_p{round(p * 10):02d}': moe_routings(p=p)['topp'] for p in SWEEP_P}
  return {'top2': routing['top2'], **sweep}


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, suite='table', seeds='0')
  check_choice('suite', args.suite, ('table', 'p_sweep'))
  config, model, moe_layer = lm_configs.moe_lm(args.runlocal)
  config.experiment = 'topp_moe'
  config.seeds = parse_seeds(args.seeds)
  # Dense-570M of the paper: hidden 1280 (20 heads x 64); d_ff 3584 gives its 570M parameters.
  # runlocal scales width the same way (x1.25).
  wide = dict(d_model=1280, num_heads=20, num_kv_heads=20, d_ff=3584)
  if args.runlocal:
    wide = dict(d_model=120, num_heads=5, num_kv_heads=5, d_ff=240)
  chosen = variants(args.suite, wide=wide)
  config.models = ml_collections.ConfigDict(
    {name: moe_model(model, v, moe_layer, name=f'variant {name}') for name, v in chosen.items()}
  )
  config.stage = ml_collections.ConfigDict(
    {name: pretrain_stage(name, aux_loss=moe_aux_loss()) for name in chosen}
  )
  config.stages = ','.join(chosen)
  return config
