"""Hugging Face parity table (experiments/hf_parity.py): kuaijax against transformers on the tiny
random model of every family (`kuaijax.hf.reference`: 2 layers, hidden 32, vocab 128, each family's
features), imported in float32 and in bfloat16; nothing is downloaded. Needs the [hf] extra.

Per family and seed: max |logit diff|, mean KL per token and the fraction of equal top-1 tokens
against transformers' float32 logits on `batch` x `length` random tokens, and the fraction of
`new_tokens` greedy tokens (after `prompt_len` prompt tokens) equal to transformers' `generate`;
the table shows the worst seed.

CPU (any; the table in experiments/hf/README.md was produced with this command):
  python -m kuaijax.main --config=configs/hf/parity.py --workdir=/tmp/kj_hf_parity
runlocal (Llama only, one seed, 8 tokens; for tests, seconds):
  python -m kuaijax.main --config=configs/hf/parity.py:runlocal --workdir=/tmp/kj_hf_parity_local
Options: `:families=llama+qwen3_moe`, `:seeds=0+1+2+3+4`.
Wall time: 2.5 to 3 min (1 min 20 s of CPU) on 2 shared CPU cores (runlocal: ~10 s). Numbers it
should reach (worst of the 3 seeds): float32 max |logit diff| <= 1.1e-5, mean KL <= 6e-13, every
top-1 and greedy token equal to transformers, for every family; bfloat16 max |logit diff| 0.1 to
0.8, mean KL <= 1e-3, top-1 equal >= 0.94 (greedy tokens diverge after the first flipped near-tie).
"""

import ml_collections

from kuaijax.config_lib import parse_arg, parse_seeds

FAMILIES = 'llama+mistral+qwen2+qwen3+mixtral+qwen2_moe+qwen3_moe'


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, families=FAMILIES, seeds='0+1+2')
  config = ml_collections.ConfigDict()
  config.experiment = 'hf_parity'
  config.parity = ml_collections.ConfigDict(
    dict(
      families=tuple(f for f in args.families.split('+') if f),
      # a seed draws the model's weights (reference.make_model) and the tokens
      seeds=parse_seeds(args.seeds),
      batch=2,
      length=24,  # > the Mistral window (5) and the YaRN original context (8)
      prompt_len=7,
      new_tokens=32,
      dtypes=('float32', 'bfloat16'),
    )
  )
  if args.runlocal:  # one family (unless named), one seed (unless named), 8 tokens
    config.parity.update(length=8, prompt_len=4, new_tokens=4)
    if args.families == FAMILIES:
      config.parity.families = ('llama',)
    if args.seeds == '0+1+2':
      config.parity.seeds = (0,)
  return config
