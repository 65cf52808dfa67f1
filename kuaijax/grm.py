"""RLMEC's generative reward model (GRM) at work: model-driven minimum editing and token rewards.

- `ModelTeacher`: any causal LM (the trained GRM, or an imported instruct model with its own
  `GrmPrompts`) judging policy samples through the locate and rewrite prompts: greedy locate, parse
  "The first error step is [k]", then greedy continuation after "Correct prediction:" + the copied
  steps 1..k-1. It returns the `minimum_edit.Edit`s the program teacher returns, so both plug into
  the same teacher stage; bad outputs are noted on the Edit (never an exception).
- `token_rewards`: from p_t = exp(log-prob) of each sample token y_t after the rewrite prompt and
  "Correct prediction:" (teacher-forced, `kuaijax.sampling.score_completion_lists`: how likely the
  GRM is to keep y_t), r_t = clip(p_t - 0.5, -0.1, 0) for wrong samples and
  clip(p_t - 0.5, 0, 0.5) for correct ones; imitation weights of the rewrite tokens come from
  `kuaijax.data.edits`.
- GRM quality: `changed_tokens` (sample tokens a rewrite does not keep), `edit_distance`,
  `reward_auc`. (Scoring speed vs a plain forward pass is timed by `experiments/bench_rlmec.py`
  through `kuaijax.benchmarking`.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax import parallel, sampling
from kuaijax.data import edits, minimum_edit, sequences
from kuaijax.losses import rl

_WIDTH_MULTIPLE = 64  # padded widths are multiples of this: few shapes, few compilations


def _round_up(x: int, multiple: int = _WIDTH_MULTIPLE) -> int:
  return max(multiple, -(-int(x) // multiple) * multiple)


def greedy_continue(
  model, tokenizer, prompts: Sequence[np.ndarray], *, max_new_tokens: int, batch_size: int
) -> tuple[list[np.ndarray], dict]:
  """Greedy completions (eos kept when the row stopped) of token prompts, and speed counts.

  Batches have one shape per call (width = the longest prompt rounded up to 64; the last batch is
  padded with copies), so one compiled program serves the call. Counts: samples, generated tokens,
  seconds (wall, compilation included).
  """
  start = time.perf_counter()
  out: list[np.ndarray] = []
  if not len(prompts):
    return out, {'samples': 0, 'tokens': 0, 'seconds': 0.0}
  width = _round_up(max(len(p) for p in prompts))
  for lo in range(0, len(prompts), batch_size):
    chunk = list(prompts[lo : lo + batch_size])
    rows = chunk + [chunk[0]] * (batch_size - len(chunk))
    tokens = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    for r, p in enumerate(rows):
      tokens[r, : len(p)] = p
    gen = sampling.generate(
      model,
      tokens,
      np.array([len(p) for p in rows], np.int32),
      greedy=True,
      max_new_tokens=max_new_tokens,
      stop_tokens=(tokenizer.eos_id,),
      pad_id=tokenizer.pad_id,
    )
    new, lengths = parallel.host_value((gen.tokens, gen.lengths))
    out += [np.asarray(new[r, : lengths[r]], np.int32) for r in range(len(chunk))]
  stats = {
    'samples': len(out),
    'tokens': int(sum(len(x) for x in out)),
    'seconds': time.perf_counter() - start,
  }
  return out, stats


@dataclasses.dataclass
class ModelTeacher:
  """A causal LM as minimum-editing teacher (module docstring); `stats` accumulates speed counts.

  Prompts longer than `max_prompt_len` tokens get Edit(-1, '', 'prompt_too_long'); an unparsable or
  out-of-range locate answer is noted and handled as `minimum_edit.parse_locate` says; a rewrite of a
  wrong sample that repeats it is noted 'unchanged'.
  """

  model: nnx.Module
  tokenizer: object
  prompts: minimum_edit.GrmPrompts = dataclasses.field(default_factory=minimum_edit.GrmPrompts)
  max_prompt_len: int = 1024
  locate_tokens: int | None = None  # None: the tokens of a locate answer naming step 999, + eos
  max_new_tokens: int = 256
  batch_size: int = 32
  stats: dict = dataclasses.field(default_factory=dict)

  def _run(self, texts: list[str], max_new_tokens: int, phase: str) -> list[str | None]:
    """Greedy continuations of prompt texts (None for a prompt that does not fit)."""
    encoded = [sequences.prompt_ids(self.tokenizer, t) for t in texts]
    fits = [i for i, e in enumerate(encoded) if len(e) <= self.max_prompt_len]
    outs, stats = greedy_continue(
      self.model,
      self.tokenizer,
      [encoded[i] for i in fits],
      max_new_tokens=max_new_tokens,
      batch_size=self.batch_size,
    )
    for key, value in stats.items():
      self.stats[f'{phase}/{key}'] = self.stats.get(f'{phase}/{key}', 0) + value
    result: list[str | None] = [None] * len(texts)
    for i, out in zip(fits, outs):
      result[i] = self.tokenizer.decode(out)
    return result

  def __call__(self, cases: Sequence[minimum_edit.Case]) -> list[minimum_edit.Edit]:
    result: list[minimum_edit.Edit | None] = [
      minimum_edit.Edit(0, c.prediction, 'correct') if c.correct else None for c in cases
    ]
    wrong = [i for i, e in enumerate(result) if e is None]
    locate_tokens = self.locate_tokens or (
      len(self.tokenizer.encode(minimum_edit.locate_target(999))) + 1
    )
    located = self._run(
      [self.prompts.locate_prompt(cases[i]) for i in wrong], locate_tokens, 'locate'
    )
    plan = []  # (case index, k, note, copied prefix)
    for i, answer in zip(wrong, located):
      if answer is None:
        result[i] = minimum_edit.Edit(-1, '', 'prompt_too_long')
        continue
      k, note = minimum_edit.parse_locate(answer, len(minimum_edit.steps(cases[i].prediction)))
      plan.append((i, k, note, minimum_edit.copy_prefix(cases[i].prediction, k)))
    prompts = [
      self.prompts.rewrite_prompt(cases[i]) + (f'{prefix}\n' if prefix else '')
      for i, _, _, prefix in plan
    ]
    continued = self._run(prompts, self.max_new_tokens, 'rewrite')
    for (i, k, note, prefix), text in zip(plan, continued):
      if text is None:
        result[i] = minimum_edit.Edit(-1, '', 'prompt_too_long')
        continue
      rewrite = minimum_edit.join_rewrite(prefix, text)
      if note == 'rewritten' and not minimum_edit.steps(cases[i].prediction):
        note = 'no_steps'
      if minimum_edit.steps(rewrite) == minimum_edit.steps(cases[i].prediction):
        note = 'unchanged'
      result[i] = minimum_edit.Edit(k, rewrite, note)
    return result


def token_rewards(keep_probs: Sequence[np.ndarray], correct: Sequence[bool]) -> list[np.ndarray]:
  """RLMEC token rewards from the GRM's keep-probabilities p_t of each sample's tokens.

  Wrong samples r_t = clip(p_t - 0.5, -0.1, 0), correct samples clip(p_t - 0.5, 0, 0.5)
  (`kuaijax.losses.rl.rlmec_token_rewards`, one padded call).
  """
  if len(keep_probs) != len(correct):
    raise ValueError(f'{len(keep_probs)} probability arrays but {len(correct)} correctness flags')
  if not len(keep_probs):
    return []
  width = max(1, max(len(x) for x in keep_probs))
  probs = np.zeros((len(keep_probs), width), np.float32)
  mask = np.zeros_like(probs)
  for r, x in enumerate(keep_probs):
    probs[r, : len(x)], mask[r, : len(x)] = x, 1.0
  rewards = np.asarray(rl.rlmec_token_rewards(probs, jnp.asarray(np.asarray(correct, bool)), mask))
  return [rewards[r, : len(x)].copy() for r, x in enumerate(keep_probs)]


def changed_tokens(sample: Sequence[int], rewrite: Sequence[int]) -> np.ndarray:
  """bool [len(sample)]: the sample tokens the rewrite does not keep (not a match on the alignment)."""
  changed = np.ones(len(sample), bool)
  for op in edits.edit_ops(sample, rewrite):
    if op.op == 'match':
      changed[op.sample_index] = False
  return changed


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
  """Token-level Levenshtein distance (the non-match moves of an optimal alignment path)."""
  return sum(op.op != 'match' for op in edits.edit_ops(a, b))


def reward_auc(rewards: Sequence[np.ndarray], bad: Sequence[np.ndarray]) -> float:
  """P(a good token's reward > a bad token's) + P(tie) / 2, pooled over all tokens (ROC AUC).

  1.0: the rewards rank every bad token (e.g. one the teacher's rewrite changes) below every good
  one; 0.5: no separation. NaN when either class is empty.
  """
  r = np.concatenate([np.asarray(x, np.float64) for x in rewards]) if rewards else np.zeros(0)
  y = np.concatenate([np.asarray(x, bool) for x in bad]) if bad else np.zeros(0, bool)
  if r.shape != y.shape:
    raise ValueError(f'reward_auc: {r.shape} rewards but {y.shape} labels')
  n_bad, n_good = int(y.sum()), int((~y).sum())
  if not n_bad or not n_good:
    return float('nan')
  _, inverse, counts = np.unique(r, return_inverse=True, return_counts=True)
  upper = np.cumsum(counts)
  ranks = (upper - (counts - 1) / 2.0)[inverse]  # average 1-based ranks, ties shared
  return float((ranks[~y].sum() - n_good * (n_good + 1) / 2) / (n_good * n_bad))
