"""PCformer vs ODE Transformer vs vanilla (and HARPE vs single-base RoPE) on kj_lm_mixture.

Variants (model overrides in `config.variants`, run in the order of `config.run_variants`):
  vanilla        L layers, 1 block evaluation per layer
  ode_rk2_gated  ODE Transformer, gated RK2 (2 evaluations per layer), same parameters (+ gates)
  pc_rk2         PCformer, RK2 EMA predictor + multistep corrector (3 evaluations per layer)
  pc_rk4         PCformer, RK4 EMA predictor + multistep corrector (5 evaluations per layer)
  vanilla_deep   3L vanilla layers: the block evaluations per token of pc_rk2 (~equal compute)
  harpe          vanilla with HARPE per-head RoPE bases (ascending between rope_b_min and b_max)
Table 2 compares `vanilla` (single base) with `harpe` on needle retrieval at the training length
and beyond.

runlocal (d_model 64, 2 layers, 200 steps of 16 x 128 tokens; recorded run: 16 min 28 s wall on 2
CPU cores shared with other jobs; validation loss vanilla_deep 2.3288 < vanilla 2.4412 < harpe
2.4460 < pc_rk2 2.6248 < ode_rk2_gated 2.6798 < pc_rk4 2.7417, so the papers' ordering does not
appear at this size; experiments/pcformer/README.md has the tables):
  python -m kuaijax.main --config=configs/pcformer/lm.py:runlocal --workdir=/tmp/kj_pcformer
full scale (mirrors the released PCformer LM: the Llama decoder of pcformer_lm/configuration_llama.py,
hidden 2048, 24 layers, 16 heads, FFN 5432, 2048 tokens, RK2 EMA predictor with alpha 0.5; one
variant per command on a v5p-64 / 64 x H100 pod, ~1.3B parameters, about a day per 100B tokens):
  python -m kuaijax.main --config=configs/pcformer/lm.py:variant=pc_rk2 --workdir=gs://.../pc_rk2
Expected at full scale (the paper's ordering; not recorded here): validation loss pc_rk4 <= pc_rk2
< ode_rk2_gated < vanilla at equal parameters; vanilla_deep (3x parameters) is the equal-compute
reference.
"""

import importlib.util
import os

import ml_collections

from kuaijax.config_lib import parse_arg

VARIANTS = ('vanilla', 'ode_rk2_gated', 'pc_rk2', 'pc_rk4', 'vanilla_deep', 'harpe')


def lm_config(arg):
  """configs/lm/mixture.py's config (loaded by path: configs/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'lm', 'mixture.py')
  spec = importlib.util.spec_from_file_location('_kuaijax_lm_mixture_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, variant='all')
  config = lm_config('runlocal' if args.runlocal else None)
  config.experiment = 'pcformer'
  config.model.update(
    d_model=2048, num_layers=24, num_heads=16, num_kv_heads=16, d_ff=5432, tie_embeddings=False
  )
  config.data.update(tokenizer='sentencepiece', spm_vocab_size=32000, seq_len=2048)
  config.model.update(vocab_size=32000, dtype='bfloat16', remat='full')
  # As released: RMSNorms (block, final) use eps 1e-6, the PC LayerNorms (per RK stage, predictor,
  # corrector) 1e-5.
  config.model.update(norm_eps=1e-6, pc_norm_eps=1e-5)
  config.train.update(steps=50_000, batch_size=512)
  config.optimizer.update(lr=3e-4, warmup_steps=2000)
  layers = 24
  harpe = dict(rope_heads='ascending', rope_b_min=1e4, rope_b_max=1e6)
  if args.runlocal:
    config.data.update(
      tokenizer='byte', seq_len=128, eval_batch_size=16, eval_batches=4, spm_vocab_size=8192
    )
    config.model.update(
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
    layers = 2
    harpe = dict(rope_heads='ascending', rope_b_min=1e3, rope_b_max=1e5)
  config.variants = ml_collections.ConfigDict(
    dict(
      vanilla=dict(stack='vanilla'),
      ode_rk2_gated=dict(stack='ode_rk2_gated'),
      pc_rk2=dict(stack='pc_rk2', pc_alpha='scalar'),
      pc_rk4=dict(stack='pc_rk4', pc_alpha='scalar'),
      vanilla_deep=dict(stack='vanilla', num_layers=3 * layers),
      harpe=dict(stack='vanilla', **harpe),
    )
  )
  if args.variant == 'all':
    config.run_variants = VARIANTS
  elif args.variant in VARIANTS:
    config.run_variants = (args.variant,)
  else:
    raise ValueError(f'config arg variant={args.variant!r} is not all or one of {list(VARIANTS)}')
  seq = config.data.seq_len
  config.retrieval = ml_collections.ConfigDict(
    dict(
      variants=('vanilla', 'harpe'),  # evaluated when they are among run_variants
      context_lengths=(seq // 2, seq, 2 * seq, 4 * seq),
      depths=(0.0, 0.5, 1.0),
      per_depth=8,
      batch_size=8,
      template='recall',
    )
  )
  return config
