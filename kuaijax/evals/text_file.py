"""Evaluators on a JSONL file of texts (one {"text": ...} per line, `kuaijax.data.text_files`).

'text_perplexity': every text (tokenized with the pipeline's tokenizer, cut to `max_len` tokens)
is one row, scored in full by `kuaijax.sampling.score`; the mean next-token NLL over all texts, its
perplexity and the NLL by position. For a model with MoE layers also the experts per token of the
MoE-stats evaluator on the same batches.

'greedy_continuations': greedy continuations of the first half (at most `prompt_tokens` tokens) of
the file's first `num_generations` texts, in one batch.

Both read the file and build their batches once, when the pipeline builds its evaluators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax import sampling
from kuaijax.data import text_files
from kuaijax.evals.base import Evaluator
from kuaijax.evals.lm_loss import BatchEvaluator
from kuaijax.evals.moe_stats import MoEStatsEvaluator
from kuaijax.evals.registry import register_evaluator

TASK = 'text'  # the one task tag of the text batches (MoE metrics 'experts_per_token/text')

PERPLEXITY_OPTIONS = dict(eval_file='', max_len=2048, max_texts=0, batch_size=8, moe_stats=True)
GENERATION_OPTIONS = dict(eval_file='', num_generations=3, prompt_tokens=32, max_new_tokens=32)


def _options(kind: str, options: dict, defaults: dict) -> dict:
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise ValueError(
      f'evaluator {kind!r}: unknown option(s) {unknown}; allowed: {sorted(defaults)}'
    )
  return {**defaults, **options}


class TextPerplexity(BatchEvaluator):
  """Next-token NLL of fixed text batches (`text_files.text_batches`).

  Metrics: mean_nll (nats per predicted token over all texts), perplexity (exp mean_nll), tokens
  (predicted tokens), texts, truncated_texts, nll_by_position (mean NLL of the prediction made at
  position t, for every t that some text has; a list) and, with `moe_stats` on a model that
  reports experts per token, the `MoEStatsEvaluator` metrics of the same batches.
  """

  def __init__(
    self,
    batches: Sequence[dict],
    *,
    texts: int,
    truncated: int,
    moe_stats: bool = True,
    mesh=None,
    rules=None,
  ):
    super().__init__(batches, (TASK,), mesh=mesh, rules=rules)
    self.texts, self.truncated = int(texts), int(truncated)
    self._moe = MoEStatsEvaluator(batches, (TASK,), mesh=mesh, rules=rules) if moe_stats else None
    self._has_moe: dict = {}

  def batch_fn(self, model, batch):
    logps, _ = sampling.score(
      model, batch['inputs'], loss_mask=batch['loss_mask'], segment_ids=batch['segment_ids']
    )
    return -logps, batch['loss_mask']

  def position_sums(self, graphdef, params) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL and number of predictions at each position, over all texts (float64)."""
    sums = counts = 0.0
    for nll, mask in self.batch_outputs(graphdef, params):
      sums = sums + np.asarray(nll, np.float64).sum(0)
      counts = counts + np.asarray(mask, np.float64).sum(0)
    return sums, counts

  def has_moe_layers(self, graphdef, params) -> bool:
    """Whether the model reports experts per token (traced abstractly once per graph)."""
    if graphdef not in self._has_moe:

      def mlp_aux(p):
        _, extras = nnx.merge(graphdef, p)(jnp.zeros((1, 2), jnp.int32), return_hidden=True)
        return extras['mlp_aux']

      aux = jax.eval_shape(mlp_aux, params)
      self._has_moe[graphdef] = any('experts_per_token' in a for a in aux)
    return self._has_moe[graphdef]

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    sums, counts = self.position_sums(graphdef, params)
    mean_nll = float(sums.sum() / counts.sum())
    seen = int(np.flatnonzero(counts).max()) + 1
    metrics = dict(
      mean_nll=mean_nll,
      perplexity=math.exp(mean_nll),
      tokens=int(counts.sum()),
      texts=self.texts,
      truncated_texts=self.truncated,
      nll_by_position=(sums[:seen] / np.maximum(counts[:seen], 1)).tolist(),
    )
    if self._moe is not None and self.has_moe_layers(graphdef, params):
      metrics.update(self._moe.evaluate(graphdef, params))
    return metrics


class GreedyContinuations(Evaluator):
  """Greedy continuations of token prompts (one `sampling.generate` call), stopping at EOS.

  Metrics: generations, a list of {prompt, completion} texts.
  """

  def __init__(self, prompts: Sequence[np.ndarray], tokenizer, *, max_new_tokens: int):
    if not prompts or min(len(p) for p in prompts) < 1:
      raise ValueError('greedy continuations need at least one non-empty prompt')
    self.prompts = [np.asarray(p, np.int32) for p in prompts]
    self.tokenizer = tokenizer
    self.max_new_tokens = int(max_new_tokens)

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    tok = self.tokenizer
    rows = np.zeros((len(self.prompts), max(len(p) for p in self.prompts)), np.int32)
    for i, p in enumerate(self.prompts):
      rows[i, : len(p)] = p
    gen = sampling.generate(
      nnx.merge(graphdef, params),
      rows,
      [len(p) for p in self.prompts],
      max_new_tokens=self.max_new_tokens,
      greedy=True,
      stop_tokens=[tok.eos_id] if tok.eos_id >= 0 else [],
      pad_id=max(tok.pad_id, 0),
    )
    return {
      'generations': [
        dict(prompt=tok.decode(p), completion=tok.decode(c))
        for p, c in zip(self.prompts, gen.to_lists(), strict=True)
      ]
    }


def prompt_heads(token_lists: Sequence[np.ndarray], prompt_tokens: int) -> list[np.ndarray]:
  """The first half of each text, at most `prompt_tokens` and at least one token."""
  return [t[: max(1, min(len(t) // 2, int(prompt_tokens)))] for t in token_lists]


@register_evaluator('text_perplexity')
def build_text_perplexity(options: dict, ctx) -> TextPerplexity:
  """Perplexity of the texts of a JSONL file, one text per row (see the module docstring).

  Options: eval_file (required), max_len (longer texts are cut, and counted as truncated_texts),
  max_texts (0: every line), batch_size (rows per batch, a multiple of the batch mesh size),
  moe_stats (experts per token of MoE layers, one more pass over the batches; no metric for a
  dense model).
  """
  o = _options('text_perplexity', options, PERPLEXITY_OPTIONS)
  texts = text_files.read_texts(o['eval_file'], int(o['max_texts']))
  token_lists, truncated = text_files.encode_texts(ctx.tokenizer, texts, int(o['max_len']))
  short = [i for i, t in enumerate(token_lists) if len(t) < 2]
  if short:
    raise ValueError(f'{o["eval_file"]}: texts {short[:5]} have fewer than 2 tokens')
  return TextPerplexity(
    text_files.text_batches(token_lists, int(o['batch_size'])),
    texts=len(texts),
    truncated=truncated,
    moe_stats=bool(o['moe_stats']),
    mesh=ctx.mesh,
    rules=ctx.rules,
  )


@register_evaluator('greedy_continuations')
def build_greedy_continuations(options: dict, ctx) -> GreedyContinuations | None:
  """Greedy continuations of the first texts of a JSONL file (see the module docstring).

  Options: eval_file (required), num_generations (texts continued; 0: no evaluator),
  prompt_tokens (at most this many prompt tokens, the first half of the text), max_new_tokens.
  """
  o = _options('greedy_continuations', options, GENERATION_OPTIONS)
  if not int(o['num_generations']):
    return None
  texts = text_files.read_texts(o['eval_file'], int(o['num_generations']))
  heads = prompt_heads([ctx.tokenizer.encode_array(t) for t in texts], o['prompt_tokens'])
  return GreedyContinuations(heads, ctx.tokenizer, max_new_tokens=int(o['max_new_tokens']))
