"""Token-level RL with a minimum-editing constraint (RLMEC, specs/rlmec.md): data features and loss.

A training example is one policy sample y with its rewrite ỹ, in the shared layout of
`sft_task.encode_sequence` ([seq_len] each, target-aligned):
  tokens, mask               the prompt + sample y and its completion mask;
  old_logps                  log pi_old(y_t) of the sampling policy (temperature 1), at y's positions;
  rewards                    per-token reward r_t of y;
  rewrite_tokens, rewrite_mask, imitation_weights
                             the prompt + rewrite ỹ, its mask and the imitation weight v_t per ỹ token.
`rlmec_loss_fn` scores y and ỹ in one forward and applies `kuaijax.losses.rl.rlmec_loss`.

`rlmec_examples` builds these features on kj_arith from the policy's own samples with a programmatic
teacher standing in for the generative reward model (GRM) of the paper:
- the rewrite of a wrong sample copies its steps up to the first step that differs from the gold
  solution and continues with the gold steps (the minimum-editing rewrite; it always reaches the gold
  answer); a correct sample is its own rewrite (correct samples are de-duplicated per problem);
- the GRM's keep-probability p_t of sample token y_t is 1 when the token-level Levenshtein alignment
  (the 'match' moves of `kuaijax.data.edits.edit_ops(sample, rewrite)`) keeps it unchanged, else 0,
  and the rewards follow the paper: r_t = clip(p_t - 0.5, -0.1, 0) for wrong samples,
  clip(p_t - 0.5, 0, 0.5) for correct ones (`rlmec_token_rewards`);
- imitation weights v over ỹ: `imitation_weights(sample, rewrite)` (1.0 on edited tokens, 0.5 else).
The paper pipeline (a trained GRM's teacher-forced probabilities) plugs into the same features.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from kuaijax.data import arith, edits
from kuaijax.losses import rl
from kuaijax.sampling import score
from kuaijax.train import sft_task

RLMEC_FEATURES = (
  'tokens',
  'mask',
  'old_logps',
  'rewards',
  'rewrite_tokens',
  'rewrite_mask',
  'imitation_weights',
)


def minimal_rewrite(sample_text: str, problem: arith.ArithProblem) -> str:
  """The sample's steps up to the first one that differs from the gold solution, then gold steps.

  Steps are compared by (expression, result); the copied steps keep their raw text. A sample whose
  steps all match the gold ones (but with a wrong answer line) keeps them and gets the gold answer.
  """
  gold = arith.parse_steps(problem.solution)
  pred = arith.parse_steps(sample_text)
  k = 0
  while (
    k < min(len(gold), len(pred))
    and pred[k].parsed
    and (pred[k].expression, pred[k].result) == (gold[k].expression, gold[k].result)
  ):
    k += 1
  lines = [s.raw.strip() for s in pred[:k]] + [s.raw for s in gold[k:]]
  return '\n'.join([*lines, f'The answer is {problem.answer}'])


def _aligned(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per-completion-token values placed at the mask's positions of a [seq_len] row."""
  out = np.zeros(mask.shape, np.float32)
  out[mask > 0] = values[: int(mask.sum())]
  return out


def rlmec_example(
  prompt: np.ndarray,
  sample: np.ndarray,
  sample_logps: np.ndarray,
  rewrite: np.ndarray,
  correct: bool,
  *,
  seq_len: int,
  pad_id: int,
) -> dict | None:
  """RLMEC features of one sample (tokens incl. stop token) and its rewrite; None if too long."""
  if len(sample_logps) != len(sample):
    raise ValueError(f'{len(sample_logps)} log-probs for {len(sample)} sample tokens')
  y = sft_task.encode_sequence(prompt, sample, seq_len, pad_id)
  ry = sft_task.encode_sequence(prompt, rewrite, seq_len, pad_id)
  if y is None or ry is None:
    return None
  if correct:
    keep = np.ones(len(sample), np.float32)
    weights = np.full(len(rewrite), 0.5, np.float32)
  else:
    keep = np.zeros(len(sample), np.float32)
    for op in edits.edit_ops(sample, rewrite):
      if op.op == 'match':
        keep[op.sample_index] = 1.0
    weights = np.asarray(edits.imitation_weights(sample, rewrite), np.float32)
  rewards = np.asarray(
    rl.rlmec_token_rewards(keep[None], jnp.asarray([correct]), np.ones((1, len(keep)))), np.float32
  )[0]
  tokens, mask = y
  rewrite_tokens, rewrite_mask = ry
  return {
    'tokens': tokens,
    'mask': mask,
    'old_logps': _aligned(np.asarray(sample_logps, np.float32), mask),
    'rewards': _aligned(rewards, mask),
    'rewrite_tokens': rewrite_tokens,
    'rewrite_mask': rewrite_mask,
    'imitation_weights': _aligned(weights, rewrite_mask),
  }


def rlmec_examples(
  problems: Sequence[arith.ArithProblem], rollouts, tokenizer, *, seq_len: int
) -> tuple[list[dict], dict]:
  """RLMEC examples from policy rollouts (see the module docstring); returns (examples, stats)."""
  examples, seen = [], set()
  stats = {'rollouts': len(rollouts), 'correct': 0, 'wrong': 0, 'duplicates': 0, 'too_long': 0}
  for r in rollouts:
    problem = problems[r.problem_index]
    if r.correct:
      key = (r.problem_index, tuple(r.tokens.tolist()))
      if key in seen:
        stats['duplicates'] += 1
        continue
      seen.add(key)
      rewrite = r.tokens
    else:
      rewrite = sft_task.completion_ids(tokenizer, minimal_rewrite(r.text, problem))
    example = rlmec_example(
      sft_task.prompt_ids(tokenizer, problem.question),
      r.tokens,
      r.logprobs,
      rewrite,
      r.correct,
      seq_len=seq_len,
      pad_id=tokenizer.pad_id,
    )
    if example is None:
      stats['too_long'] += 1
      continue
    stats['correct' if r.correct else 'wrong'] += 1
    examples.append(example)
  stats['examples'] = len(examples)
  return examples, stats


def rlmec_loss_fn(*, eps: float = 0.3, lam: float = 1.0):
  """`loss_fn(model, batch, rng)` for the trainer over RLMEC features (one forward for y and ỹ)."""
  if not 0.0 <= eps < 1.0:
    raise ValueError(f'rlmec.eps must lie in [0, 1), got {eps}')
  if not lam >= 0:
    raise ValueError(f'rlmec.lam must be >= 0, got {lam}')

  def loss_fn(model, batch, rng):
    del rng
    tokens = jnp.concatenate([batch['tokens'], batch['rewrite_tokens']])
    mask = jnp.concatenate([batch['mask'], batch['rewrite_mask']])
    token_logps, _ = score(model, tokens, loss_mask=mask)
    logps, imitation_logps = jnp.split(token_logps, 2)
    return rl.rlmec_loss(
      logps,
      batch['old_logps'],
      batch['rewards'],
      batch['mask'],
      imitation_logps,
      batch['imitation_weights'],
      batch['rewrite_mask'],
      eps=eps,
      lam=lam,
    )

  return loss_fn
