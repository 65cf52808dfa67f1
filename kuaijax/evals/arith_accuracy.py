"""Exact-answer accuracy on kj_arith problems by difficulty level, from the model's own generations.

`accuracy_by_level(texts, problems)` scores given completions (checked with
`kuaijax.data.arith.check_answer`); `generate_completions` decodes with `kuaijax.sampling.generate`
(greedy, or sampled under a seed); `evaluate_arith` repeats the evaluation over several seeds and
reports the mean and spread per level; `ArithEvaluator` is the trainer's `evaluate(model, step)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from kuaijax import sampling
from kuaijax.data import arith


def accuracy_by_level(texts: Sequence[str], problems: Sequence[arith.ArithProblem]) -> dict:
  """{'accuracy', 'count', 'accuracy/level_k', 'count/level_k'} over the levels present.

  A text is correct iff its last 'The answer is N' gives the gold answer. Raises on a length
  mismatch; an empty list gives count 0 and accuracy NaN.
  """
  if len(texts) != len(problems):
    raise ValueError(f'{len(texts)} texts for {len(problems)} problems')
  correct = np.array([arith.check_answer(t, p.answer) for t, p in zip(texts, problems)], bool)
  levels = np.array([p.level for p in problems], np.int64)
  out = {'accuracy': float(correct.mean()) if len(correct) else float('nan'), 'count': len(texts)}
  for level in sorted(set(levels.tolist())):
    sel = levels == level
    out[f'accuracy/level_{level}'] = float(correct[sel].mean())
    out[f'count/level_{level}'] = int(sel.sum())
  return out


def prompt_batch(
  tokenizer, questions: Sequence[str], prompt_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded `[bos] + format_prompt(question)` rows [B, prompt_len] and their lengths."""
  prompts = np.full((len(questions), prompt_len), tokenizer.pad_id, np.int32)
  lengths = np.zeros(len(questions), np.int32)
  for i, question in enumerate(questions):
    ids = tokenizer.encode_array(arith.format_prompt(question))
    if len(ids) + 1 > prompt_len:
      raise ValueError(
        f'prompt of {len(ids) + 1} tokens exceeds prompt_len={prompt_len}: {question[:60]!r}...'
      )
    prompts[i, 0] = tokenizer.bos_id
    prompts[i, 1 : len(ids) + 1] = ids
    lengths[i] = len(ids) + 1
  return prompts, lengths


def decode_completions(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """Texts of generated rows, each cut at its length (the stop token is dropped by decode)."""
  return [
    tokenizer.decode(row[: int(n)]) for row, n in zip(np.asarray(tokens), np.asarray(lengths))
  ]


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One sampled solution: completion tokens (stop token included when it stopped), raw per-token
  log-probs under the sampling model (temperature 1), decoded text and exact-answer correctness."""

  problem_index: int
  tokens: np.ndarray
  logprobs: np.ndarray
  text: str
  correct: bool


def sample_solutions(
  model,
  tokenizer,
  problems: Sequence[arith.ArithProblem],
  *,
  num_samples: int = 1,
  seed: int = 0,
  greedy: bool = False,
  temperature: float = 1.0,
  top_p: float | None = None,
  max_new_tokens: int = 128,
  prompt_len: int = 320,
  batch_size: int = 64,
) -> list[Rollout]:
  """`num_samples` rollouts per problem (rows of problem i are consecutive), via `sampling.generate`.

  Batches of `batch_size` prompts have a fixed shape (the last is padded with copies) so one
  compiled program serves every call; batch b samples with `fold_in(key(seed), b)`.
  """
  if not problems:
    return []
  rollouts = []
  for start in range(0, len(problems), batch_size):
    chunk = list(problems[start : start + batch_size])
    questions = [p.question for p in chunk] + [chunk[0].question] * (batch_size - len(chunk))
    prompts, lengths = prompt_batch(tokenizer, questions, prompt_len)
    gen = sampling.generate(
      model,
      prompts,
      lengths,
      rng=jax.random.fold_in(jax.random.key(seed), start // batch_size),
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      greedy=greedy,
      stop_tokens=(tokenizer.eos_id,),
      num_samples=num_samples,
      pad_id=tokenizer.pad_id,
    )
    tokens, logprobs, gen_lengths = jax.device_get((gen.tokens, gen.logprobs, gen.lengths))
    texts = decode_completions(tokenizer, tokens, gen_lengths)
    for row in range(len(chunk) * num_samples):
      i, n = row // num_samples, int(gen_lengths[row])
      problem = chunk[i]
      rollouts.append(
        Rollout(
          start + i,
          np.asarray(tokens[row, :n], np.int32),
          np.asarray(logprobs[row, :n], np.float32),
          texts[row],
          arith.check_answer(texts[row], problem.answer),
        )
      )
  return rollouts


def generate_completions(model, tokenizer, problems, **options) -> list[str]:
  """One completion text per problem (`sample_solutions` with num_samples=1)."""
  return [r.text for r in sample_solutions(model, tokenizer, problems, num_samples=1, **options)]


def summarise_seeds(per_seed: Sequence[dict]) -> dict:
  """Mean, sample std (ddof 1; 0 for one seed), min and max of every accuracy key over seeds."""
  out = {}
  for key in per_seed[0]:
    if not key.startswith('accuracy'):
      out[key] = per_seed[0][key]
      continue
    values = np.array([r[key] for r in per_seed], np.float64)
    out[key] = float(values.mean())
    out[f'{key}/std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out[f'{key}/min'], out[f'{key}/max'] = float(values.min()), float(values.max())
  out['num_seeds'] = len(per_seed)
  return out


def evaluate_arith(
  model, tokenizer, problems: Sequence[arith.ArithProblem], *, seeds: Sequence[int] = (0,), **kw
) -> dict:
  """`accuracy_by_level` for each seed, summarised by `summarise_seeds`, plus the per-seed runs.

  With greedy decoding every seed gives the same texts; use `greedy=False` and a temperature for
  a spread. Keyword options go to `generate_completions`.
  """
  if not seeds:
    raise ValueError('evaluate_arith needs at least one seed')
  per_seed = [
    accuracy_by_level(generate_completions(model, tokenizer, problems, seed=s, **kw), problems)
    for s in seeds
  ]
  return {**summarise_seeds(per_seed), 'per_seed': per_seed}


class ArithEvaluator:
  """`evaluate(model, step) -> dict` for the trainer: accuracy by level on fixed problems."""

  def __init__(self, tokenizer, problems, *, seeds=(0,), **generate_options):
    self.tokenizer, self.problems = tokenizer, list(problems)
    self.seeds, self.options = tuple(seeds), generate_options

  def __call__(self, model, step: int | None = None) -> dict:
    del step
    result = evaluate_arith(model, self.tokenizer, self.problems, seeds=self.seeds, **self.options)
    return {k: v for k, v in result.items() if k != 'per_seed'}
