"""A process reward model (PRM): a causal LM that judges each solution step with one token.

The PRM reads `[bos] + prompt + prefix + step` and judges the step at its last token by two tokens
of its own LM head: z = logit('+') - logit('-'), p(good step) = sigmoid(z). It is an ordinary model
role (any size) trained by the generic `train` stage with method 'prm' on records of
  `prompt` (text), `prefix_tokens` (the completion before the step; may be empty), `step_tokens`
  and a label in [0, 1] (`label_field`, default 'mc_value': the step's Monte Carlo value),
with the binary cross-entropy between p and the (soft) label, so the PRM regresses the value.

Uses beyond SPPD's pair values: `score_steps` (a step's p at each step end of whole solutions, one
forward per solution), `solution_scores` (their minimum: a best-of-n reranker with
`kuaijax.sampling.best_of_n`) and `step_token_rewards` (per-step rewards as the [B, T] token rewards
and mask that `kuaijax.losses.rl.grpo_process_rewards` takes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kuaijax import parallel
from kuaijax.data import sequences
from kuaijax.jit_cache import ParamsJit
from kuaijax.methods.base import Method, register_method
from kuaijax.models.layers import dense

JUDGE_TEXT = ('+', '-')  # the good / bad judgement tokens


def judge_ids(tokenizer) -> tuple[int, int]:
  """The token ids of '+' and '-' (each must be one token)."""
  ids = [tokenizer.encode(text) for text in JUDGE_TEXT]
  if any(len(i) != 1 for i in ids):
    raise ValueError(f'the PRM judgement texts {JUDGE_TEXT} must be single tokens, got {ids}')
  return ids[0][0], ids[1][0]


def judge_logits(model, tokens, segment_ids, positions, ids: tuple[int, int]) -> jax.Array:
  """z = logit(good) - logit(bad) [B, K] at token positions [B, K] of rows tokens [B, L]."""
  hidden, _ = model(tokens, segment_ids=segment_ids, return_hidden=True)
  picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, K, d]
  head = model.output_head()[:, jnp.asarray(ids)].astype(picked.dtype)
  logits = dense(picked, head).astype(jnp.float32)
  return logits[..., 0] - logits[..., 1]


@register_method('prm')
class PRM(Method):
  """See the module docstring. Options: label_field (the record field holding the label)."""

  token_fields = ('tokens',)

  def __init__(self, ctx, *, loss=None, label_field: str = 'mc_value'):
    super().__init__(ctx, loss=loss)
    self.label_field = label_field
    self.ids = judge_ids(ctx.tokenizer)

  def examples(self, records):
    """Rows as wide as the longest record rounded up to 64 tokens (at most seq_len; longer
    records are dropped): the judged rows are far shorter than a packed SFT row."""
    tok, seq_len = self.ctx.tokenizer, self.ctx.seq_len
    rows, labels = [], []
    for r in records:
      label = float(r[self.label_field])
      if not 0.0 <= label <= 1.0:
        raise ValueError(f'prm: {self.label_field}={label} must lie in [0, 1]')
      prompt = sequences.prompt_ids(tok, r['prompt'])
      rows.append(np.concatenate([prompt, r.get('prefix_tokens', []), r['step_tokens']]))
      labels.append(label)
    fits = [len(t) <= seq_len for t in rows]
    width = min(seq_len, -(-max((len(t) for t in rows), default=1) // 64) * 64)
    out = []
    for tokens, label, fit in zip(rows, labels, fits):
      if not fit:
        continue
      row = np.full(width, tok.pad_id, np.int32)
      row[: len(tokens)] = tokens
      out.append(
        {
          'tokens': row,
          'segment_ids': (np.arange(width) < len(tokens)).astype(np.int32),
          'position': np.int32(len(tokens) - 1),
          'label': np.float32(label),
        }
      )
    kept = [label for label, fit in zip(labels, fits) if fit]
    return out, {
      'examples': len(out),
      'too_long': len(rows) - len(out),
      'label_mean': float(np.mean(kept)) if kept else float('nan'),
    }

  def loss_fn(self, model, batch, rng, frozen=None):
    del rng, frozen
    z = judge_logits(
      model, batch['tokens'], batch['segment_ids'], batch['position'][:, None], self.ids
    )[:, 0]
    y = batch['label']
    loss = -(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z)).mean()
    accuracy = ((z > 0) == (y > 0.5)).astype(jnp.float32).mean()
    return loss, {'accuracy': accuracy, 'p_good': jax.nn.sigmoid(z).mean(), 'label': y.mean()}


_judge_jit = ParamsJit(judge_logits, static_argnames=('ids',))


def step_ends(completion: np.ndarray, delimiters: Sequence[int]) -> np.ndarray:
  """Indices (into the completion) of the tokens that end its steps: each delimiter, and the last
  token when it is not one (the final step, ended by eos or cut)."""
  completion = np.asarray(completion)
  ends = np.flatnonzero(np.isin(completion, delimiters))
  if len(completion) and (not len(ends) or ends[-1] != len(completion) - 1):
    ends = np.append(ends, len(completion) - 1)
  return ends.astype(np.int32)


def score_steps(
  graphdef,
  params,
  tokenizer,
  prompts: Sequence[np.ndarray],
  completions: Sequence[np.ndarray],
  ends: Sequence[np.ndarray],
  *,
  batch_size: int,
  width_multiple: int = 64,
) -> list[np.ndarray]:
  """p(good step) [len(ends[i])] float32 of each (prompt, completion) pair at the completion
  indices `ends[i]` (e.g. `step_ends`): one forward per pair, batches of `batch_size` rows padded to
  a multiple of `width_multiple` tokens (few compiled shapes). Prompts hold bos."""
  if not len(prompts) == len(completions) == len(ends):
    raise ValueError(f'{len(prompts)} prompts, {len(completions)} completions, {len(ends)} ends')
  ids = judge_ids(tokenizer)
  round_up = lambda n, m: max(m, -(-int(n) // m) * m)
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = range(start, min(start + batch_size, len(prompts)))
    rows = [np.concatenate([prompts[i], completions[i]]) for i in chunk]
    at = [len(prompts[i]) + np.asarray(ends[i], np.int32) for i in chunk]
    rows += [rows[0]] * (batch_size - len(rows))  # fixed shape: padded with copies
    width = round_up(max(len(r) for r in rows), width_multiple)
    tokens = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    positions = np.zeros((batch_size, round_up(max(len(e) for e in at), 8)), np.int32)
    for i, row in enumerate(rows):
      tokens[i, : len(row)], segments[i, : len(row)] = row, 1
    for i, e in enumerate(at):
      positions[i, : len(e)] = e
    z = parallel.host_value(_judge_jit(graphdef, params, tokens, segments, positions, ids=ids))
    out += [(1.0 / (1.0 + np.exp(-z[i, : len(e)]))).astype(np.float32) for i, e in enumerate(at)]
  return out


def solution_scores(step_probs: Sequence[np.ndarray]) -> np.ndarray:
  """A solution's score from its steps' p(good): the minimum (a solution is as good as its worst
  step); 0 for a solution without steps."""
  return np.array([float(np.min(p)) if len(p) else 0.0 for p in step_probs], np.float32)


def step_token_rewards(
  step_probs: Sequence[np.ndarray], ends: Sequence[np.ndarray], width: int
) -> tuple[np.ndarray, np.ndarray]:
  """(rewards [B, width] float32, mask [B, width] bool): each step's p(good) at its last completion
  token (`ends`, as `step_ends` gives), 0 / False elsewhere: per-step rewards for GRPO
  (`kuaijax.losses.rl.grpo_process_rewards(rewards, group_size, mask=mask)`)."""
  rewards = np.zeros((len(step_probs), width), np.float32)
  mask = np.zeros((len(step_probs), width), bool)
  for i, (p, e) in enumerate(zip(step_probs, ends, strict=True)):
    e = np.asarray(e)
    if len(p) != len(e) or (len(e) and e.max() >= width):
      raise ValueError(f'step_token_rewards: row {i} has {len(p)} scores, ends {e}, width {width}')
    rewards[i, e], mask[i, e] = p, True
  return rewards, mask
