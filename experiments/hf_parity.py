"""Hugging Face parity table: kuaijax against transformers on tiny random models of every family.

For each family of `config.parity.families` and each seed s: `kuaijax.hf.reference.make_model`
builds the family's tiny random transformers model (2 layers, hidden 32, vocab 128, the family's
features; weights drawn with seed s) and saves it; kuaijax imports the folder with
`model_io.load_model(folder, dtype=...)` for each of `config.parity.dtypes` (bfloat16: parameters
and compute in bfloat16, router and softmax in float32) and is compared with the float32
transformers model on `batch` x `length` tokens drawn uniformly from [3, vocab) with seed s:

- max |logit diff| over every position and vocabulary entry;
- mean over positions of KL(transformers || kuaijax) of the next-token distributions (float64);
- the fraction of positions whose most probable next token is the same (top-1);
- the fraction of `new_tokens` greedy tokens after the first `prompt_len` tokens that equal
  transformers' greedy `generate` (kuaijax: `sampling.generate`, its compiled KV-cache loop); one
  flipped near-tie changes every later token, so this is the strictest of the four.

The table shows the worst seed of each number (largest difference, smallest agreement);
results.json holds every seed's numbers. Writes results.json and results.md into the workdir.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax import sampling
from kuaijax.config_lib import check_choice
from kuaijax.results import write_results

# What each family's tiny model exercises (kuaijax.hf.reference.FAMILY_CONFIGS).
FEATURES = {
  'llama': 'Llama-3 RoPE scaling',
  'mistral': 'sliding window 5',
  'qwen2': 'q/k/v biases, tied embeddings, YaRN factor 4 over 8 positions',
  'qwen3': 'q/k norm, head_dim 16',
  'mixtral': '4 experts, top-2',
  'qwen2_moe': '4 fine-grained experts + gated shared expert',
  'qwen3_moe': '8 experts, top-2, norm_topk_prob, q/k norm',
}
METRICS = ('max_abs_logit_diff', 'mean_kl', 'top1_equal', 'greedy_equal')


def _log_softmax(x) -> np.ndarray:
  x = np.float64(x)
  top = x.max(-1, keepdims=True)
  return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def kl_per_token(ref, out) -> float:
  """Mean over positions of KL(softmax(ref) || softmax(out)), in float64."""
  lp, lq = _log_softmax(ref), _log_softmax(out)
  return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


def compare(folder: str, dtype: str, tokens: np.ndarray, ref: np.ndarray, ref_greedy, p) -> dict:
  """The four numbers of the folder imported in `dtype` against transformers' float32 logits
  `ref` of `tokens` and its greedy tokens `ref_greedy`."""
  from kuaijax.hf import model_io

  model = model_io.load_model(folder, dtype=dtype)
  out = np.asarray(_logits(model, jnp.asarray(tokens)), np.float32)
  prompts = tokens[:, : p.prompt_len]
  greedy = sampling.generate(
    model, prompts, [p.prompt_len] * len(prompts), max_new_tokens=p.new_tokens, greedy=True
  )
  return dict(
    max_abs_logit_diff=float(np.max(np.abs(out - ref))),
    mean_kl=kl_per_token(ref, out),
    top1_equal=float(np.mean(out.argmax(-1) == ref.argmax(-1))),
    greedy_equal=float(np.mean(np.asarray(greedy.tokens) == ref_greedy)),
  )


def measure(family: str, seed: int, p, workdir: str) -> dict:
  """{dtype: numbers} of the family's tiny model drawn with `seed`."""
  from kuaijax.hf import reference

  folder = os.path.join(workdir, 'models', f'{family}_seed{seed}')
  hf = reference.make_model(family, folder, seed=seed)
  tokens = np.random.RandomState(seed).randint(3, hf.config.vocab_size, (p.batch, p.length))
  ref = reference.logits(hf, tokens)
  ref_greedy = reference.greedy(hf, tokens[:, : p.prompt_len], p.new_tokens)
  return {dtype: compare(folder, dtype, tokens, ref, ref_greedy, p) for dtype in p.dtypes}


def worst(per_seed: list[dict], metric: str) -> float:
  values = [numbers[metric] for numbers in per_seed]
  return min(values) if metric.endswith('_equal') else max(values)


def table(results: dict, p) -> str:
  head = ['family (what its tiny model exercises)']
  for dtype in p.dtypes:
    head += [f'{dtype}: {name}' for name in ('max abs logit diff', 'mean KL', 'top-1 equal')]
    head.append(f'{dtype}: greedy tokens equal')
  lines = [
    '## kuaijax vs transformers, tiny random models',
    '',
    f'{p.batch} x {p.length} random tokens; greedy: {p.new_tokens} tokens after {p.prompt_len}; '
    f'worst of seeds {list(p.seeds)} (weights and tokens); reference: transformers in float32.',
    '',
    '| ' + ' | '.join(head) + ' |',
    '|---|' + '---:|' * (len(head) - 1),
  ]
  for family, by_dtype in results['worst'].items():
    row = [f'{family} ({FEATURES[family]})']
    for dtype in p.dtypes:
      numbers = by_dtype[dtype]
      row += [
        f'{numbers["max_abs_logit_diff"]:.1e}',
        f'{numbers["mean_kl"]:.1e}',
        f'{numbers["top1_equal"]:.2f}',
        f'{numbers["greedy_equal"]:.2f}',
      ]
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> dict:
  import torch
  import transformers

  p = config.parity
  for family in p.families:
    check_choice('parity.families', family, FEATURES)
  for dtype in p.dtypes:
    check_choice('parity.dtypes', dtype, ('float32', 'bfloat16'))
  os.makedirs(workdir, exist_ok=True)
  families = {}
  for family in p.families:
    families[family] = {str(seed): measure(family, seed, p, workdir) for seed in p.seeds}
  results = dict(
    families=families,
    worst={
      family: {
        dtype: {m: worst([by_seed[str(s)][dtype] for s in p.seeds], m) for m in METRICS}
        for dtype in p.dtypes
      }
      for family, by_seed in families.items()
    },
    seeds={'training': [], 'sampling': [], 'weights_and_tokens': list(p.seeds)},
    versions={'transformers': transformers.__version__, 'torch': torch.__version__},
  )
  write_results(workdir, results, table(results, p))
  return results
