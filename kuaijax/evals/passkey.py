"""Synthetic needle retrieval (passkey) over context lengths, scored by teacher forcing.

Each example is one document `[bos] + haystack-with-needle + query + answer`, right-aligned in a row
of exactly `context_len` tokens (padding on the left is segment 0, so the document starts at
position 0 whatever its length). The needle sits at a relative `depth` of the haystack (0 = first,
1 = last). An example counts as retrieved when the model's argmax at every answer position is the
answer token (what greedy decoding would produce); the answer loss is the mean cross-entropy of
the answer tokens in nats.

Templates:
- 'recall' (the kj_lm_mixture recall task, so a model trained on the mixture can be asked at
  lengths it never saw): `recall: ab=12, cd=345, ... . query cd -> 345`;
- 'passkey' (the classic needle test): filler sentences, `The pass key is 48213. Remember it.
  48213 is the pass key.` at the depth, then `What is the pass key? The pass key is 48213`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax import parallel
from kuaijax.evals.base import Evaluator
from kuaijax.evals.registry import register_evaluator
from kuaijax.jit_cache import ParamsJit, split_params

TEMPLATES = ('recall', 'passkey')
_KEYS = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
_FILLER = (
  'The grass is green. ',
  'The sky is blue. ',
  'The sun is yellow. ',
  'Here we go. ',
  'There and back again. ',
)


def _recall_document(rng: random.Random, budget: int, depth: float, encode) -> tuple[str, str]:
  """(prompt, answer) with as many key=value pairs as fit in `budget` tokens."""
  keys = rng.sample(_KEYS, len(_KEYS))
  pairs = [f'{k}={rng.randint(0, 999)}' for k in keys]

  def document(n):
    key, value = pairs[round(depth * (n - 1))].split('=')
    return f'recall: {", ".join(pairs[:n])}. query {key} -> ', value

  size = lambda n: sum(len(encode(part)) for part in document(n))
  n = 1
  while n < len(pairs) and size(n + 1) <= budget:
    n += 1
  if size(n) > budget:
    raise ValueError(f'a context of {budget} tokens is too short for one recall pair')
  return document(n)


def _passkey_document(rng: random.Random, budget: int, depth: float, encode) -> tuple[str, str]:
  """(prompt, answer): filler sentences with the passkey sentence at `depth`, then the question."""
  key = str(rng.randint(10000, 99999))
  needle = f'The pass key is {key}. Remember it. {key} is the pass key. '
  question = 'What is the pass key? The pass key is '
  size = len(encode(needle + question)) + len(encode(key))
  if size > budget:
    raise ValueError(f'a context of {budget} tokens is too short for the passkey needle')
  sentences = []
  while size + len(encode(_FILLER[len(sentences) % len(_FILLER)])) <= budget:
    size += len(encode(_FILLER[len(sentences) % len(_FILLER)]))
    sentences.append(_FILLER[len(sentences) % len(_FILLER)])
  cut = round(depth * len(sentences))
  return ''.join(sentences[:cut]) + needle + ''.join(sentences[cut:]) + question, key


def retrieval_batch(
  tokenizer, context_len: int, depths: Sequence[float], per_depth: int, *, template='recall', seed=0
) -> dict:
  """Right-aligned rows of `context_len` tokens with their answer masks.

  Returns numpy arrays: inputs / targets / positions / segment_ids [n, context_len] and
  answer_mask [n, context_len] (1 where the target is an answer token), plus depth [n].
  """
  if template not in TEMPLATES:
    raise ValueError(f'template={template!r} is not one of {list(TEMPLATES)}')
  if any(not 0.0 <= d <= 1.0 for d in depths):
    raise ValueError(f'depths must lie in [0, 1], got {list(depths)}')
  make = _recall_document if template == 'recall' else _passkey_document
  rng = random.Random(f'{template}:{context_len}:{seed}')
  rows = {k: [] for k in ('inputs', 'targets', 'positions', 'segment_ids', 'answer_mask')}
  row_depths = []
  for depth in depths:
    for _ in range(per_depth):
      # Budget: the document is [bos] + prompt + answer and supplies context_len + 1 tokens.
      prompt, answer = make(rng, context_len, depth, tokenizer.encode)
      prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
      answer_ids = tokenizer.encode(answer)
      doc = np.asarray(prompt_ids + answer_ids, np.int32)
      n, pad = len(doc) - 1, context_len - (len(doc) - 1)
      if pad < 0:
        raise ValueError(f'a {template} document of {n} tokens exceeds context_len={context_len}')
      mask = np.zeros(n, np.float32)
      mask[len(prompt_ids) - 1 :] = 1.0
      rows['inputs'].append(np.concatenate([np.zeros(pad, np.int32), doc[:-1]]))
      rows['targets'].append(np.concatenate([np.zeros(pad, np.int32), doc[1:]]))
      rows['positions'].append(np.concatenate([np.zeros(pad, np.int32), np.arange(n)]))
      rows['segment_ids'].append(np.concatenate([np.zeros(pad, np.int32), np.ones(n, np.int32)]))
      rows['answer_mask'].append(np.concatenate([np.zeros(pad, np.float32), mask]))
      row_depths.append(depth)
  out = {k: np.stack(v) for k, v in rows.items()}
  out['depth'] = np.asarray(row_depths, np.float32)
  return out


def score_retrieval(logits, targets, answer_mask) -> tuple[np.ndarray, np.ndarray]:
  """Per-example (retrieved: all answer argmaxes right, mean answer cross-entropy in nats)."""
  logits = jnp.asarray(logits, jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
  right = jnp.argmax(logits, axis=-1) == targets
  mask = jnp.asarray(answer_mask) > 0
  retrieved = jnp.all(right | ~mask, axis=-1)
  loss = -(target_logp * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1)
  return parallel.host_value((retrieved, loss))


_forward = ParamsJit(
  lambda model, inputs, positions, segment_ids: model(
    inputs, positions=positions, segment_ids=segment_ids
  )[0]
)


def _forward_fn(model) -> Callable:
  """`batch -> logits` for an NNX model (compiled once per graph) or any callable LM."""
  if not isinstance(model, nnx.Module):
    return lambda b: model(
      jnp.asarray(b['inputs']), positions=b['positions'], segment_ids=b['segment_ids']
    )[0]
  graphdef, params = split_params(model)
  return _params_forward(graphdef, params)


def _params_forward(graphdef, params) -> Callable:
  return lambda b: _forward(graphdef, params, b['inputs'], b['positions'], b['segment_ids'])


def evaluate_retrieval(
  model,
  tokenizer,
  context_lengths: Sequence[int],
  *,
  depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
  per_depth: int = 4,
  batch_size: int = 8,
  template: str = 'recall',
  seed: int = 0,
) -> dict:
  """{context_len: {'accuracy', 'answer_loss', 'examples', 'accuracy_by_depth'}} for a model.

  `model` is an NNX LM (`model(tokens, positions=, segment_ids=) -> (logits, extras)`) or any
  callable with that signature.
  """
  return _retrieval(
    _forward_fn(model),
    tokenizer,
    context_lengths,
    depths=depths,
    per_depth=per_depth,
    batch_size=batch_size,
    template=template,
    seed=seed,
  )


def _retrieval(
  forward, tokenizer, context_lengths, *, depths, per_depth, batch_size, template, seed
):
  results = {}
  for length in context_lengths:
    batch = retrieval_batch(tokenizer, int(length), depths, per_depth, template=template, seed=seed)
    retrieved, losses = [], []
    for start in range(0, len(batch['depth']), batch_size):
      part = {k: v[start : start + batch_size] for k, v in batch.items()}
      r, loss = score_retrieval(forward(part), part['targets'], part['answer_mask'])
      retrieved.append(r)
      losses.append(loss)
    retrieved, losses = np.concatenate(retrieved), np.concatenate(losses)
    by_depth = {float(d): float(retrieved[batch['depth'] == d].mean()) for d in sorted(set(depths))}
    results[int(length)] = {
      'accuracy': float(retrieved.mean()),
      'answer_loss': float(losses.mean()),
      'examples': int(len(retrieved)),
      'accuracy_by_depth': by_depth,
    }
  return results


class PasskeyEvaluator(Evaluator):
  """Retrieval accuracy and answer loss per context length (metrics `passkey/{len}/accuracy`,
  `passkey/{len}/answer_loss`), the evaluator registered as 'passkey'."""

  def __init__(self, tokenizer, context_lengths: Sequence[int], **options):
    if not context_lengths:
      raise ValueError('passkey: context_lengths is empty')
    self.tokenizer, self.lengths, self.options = tokenizer, tuple(context_lengths), options

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    results = _retrieval(
      _params_forward(graphdef, params), self.tokenizer, self.lengths, **self.options
    )
    out = {}
    for length, r in results.items():
      out[f'passkey/{length}/accuracy'] = r['accuracy']
      out[f'passkey/{length}/answer_loss'] = r['answer_loss']
    return out


@register_evaluator('passkey')
def build(options: dict, ctx) -> PasskeyEvaluator:
  """Retrieval by context length. Options: context_lengths, depths, per_depth, batch_size,
  template, seed."""
  return PasskeyEvaluator(
    ctx.tokenizer,
    tuple(options['context_lengths']),
    depths=tuple(options['depths']),
    per_depth=options['per_depth'],
    batch_size=options['batch_size'],
    template=options['template'],
    seed=options['seed'],
  )
