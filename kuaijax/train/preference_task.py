"""Pairwise preference training (DPO family, CaPO, D2PO) on (prompt, chosen, rejected) triples.

A pair example holds two sequences in the shared layout of `sft_task.encode_sequence`:
`chosen_tokens`, `chosen_mask`, `rejected_tokens`, `rejected_mask` ([seq_len] each). The loss is
chosen by name (`PREFERENCE_LOSSES`): the six DPO loss types of `kuaijax.losses.preference.dpo_loss`,
'capo' (sigmoid DPO on context-aware pairs, `capo_loss`) and 'd2po' (temporal decay, `d2po_loss`).

Reference log-probs come from one of two places, chosen by `reference`:
- 'precomputed': `precompute_reference_logps` scores every pair once with the reference model
  before training and stores per-token `ref_chosen_logps` / `ref_rejected_logps` in the examples;
- 'model': the reference params ride along as the trainer's `frozen` state and are scored every step.
Both give the same loss (tested); the first costs one pass over the data, the second one extra
forward per step but no storage. simpo needs no reference at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax.config_lib import check_choice
from kuaijax.data import arith
from kuaijax.losses import preference as pref
from kuaijax.sampling import score
from kuaijax.train import sft_task

PREFERENCE_LOSSES = (*pref.DPO_LOSS_TYPES, 'capo', 'd2po')
REFERENCE_SOURCES = ('precomputed', 'model')
_SIDES = ('chosen', 'rejected')


def pair_example(
  prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, seq_len: int, pad_id: int
) -> dict | None:
  """One pair in the shared layout, or None when either side does not fit in seq_len."""
  c = sft_task.encode_sequence(prompt, chosen, seq_len, pad_id)
  r = sft_task.encode_sequence(prompt, rejected, seq_len, pad_id)
  if c is None or r is None:
    return None
  return {
    'chosen_tokens': c[0],
    'chosen_mask': c[1],
    'rejected_tokens': r[0],
    'rejected_mask': r[1],
  }


def pairs_from_rollouts(
  problems: Sequence[arith.ArithProblem],
  rollouts,
  tokenizer,
  *,
  seq_len: int,
  max_pairs_per_problem: int = 1,
  gold_fallback: bool = False,
) -> tuple[list[dict], dict]:
  """(correct, wrong) pairs of a policy's own samples (the RLMEC paper's DPO baseline).

  For each problem with at least one correct and one wrong distinct sample, the first
  `max_pairs_per_problem` correct and wrong samples are zipped into pairs. With `gold_fallback`, a
  problem with wrong samples only pairs them with its gold solution as the chosen side (for
  policies too weak to produce correct samples). Returns (pairs, stats).
  """
  by_problem: dict[int, list] = {}
  for r in rollouts:
    by_problem.setdefault(r.problem_index, []).append(r)
  pairs, mixed, gold, too_long = [], 0, 0, 0
  for index, group in sorted(by_problem.items()):
    seen, right, wrong = set(), [], []
    for r in group:
      key = tuple(r.tokens.tolist())
      if key in seen:
        continue
      seen.add(key)
      (right if r.correct else wrong).append(r)
    problem = problems[index]
    chosen = [c.tokens for c in right]
    if not chosen and wrong and gold_fallback:
      chosen, gold = [sft_task.completion_ids(tokenizer, problem.solution)] * len(wrong), gold + 1
    if not chosen or not wrong:
      continue
    mixed += bool(right)
    prompt = sft_task.prompt_ids(tokenizer, problem.question)
    for c, w in list(zip(chosen, wrong))[:max_pairs_per_problem]:
      example = pair_example(prompt, c, w.tokens, seq_len, tokenizer.pad_id)
      if example is None:
        too_long += 1
      else:
        pairs.append(example)
  stats = {
    'problems': len(by_problem),
    'mixed_problems': mixed,
    'gold_chosen_problems': gold,
    'pairs': len(pairs),
    'too_long': too_long,
  }
  return pairs, stats


def _stack_sides(batch):
  tokens = jnp.concatenate([batch['chosen_tokens'], batch['rejected_tokens']])
  mask = jnp.concatenate([batch['chosen_mask'], batch['rejected_mask']])
  return tokens, mask


def _policy_token_logps(model, batch):
  """Per-token log-probs of both sides in one forward: (chosen [B, L], rejected [B, L])."""
  tokens, mask = _stack_sides(batch)
  token_logps, _ = score(model, tokens, loss_mask=mask)
  return jnp.split(token_logps, 2)


def precompute_reference_logps(
  reference_model, examples: Sequence[dict], *, batch_size: int
) -> list[dict]:
  """The examples with per-token `ref_chosen_logps` / `ref_rejected_logps` from the reference model.

  Scores fixed-shape batches (the last one padded with copies) with one compiled program.
  """
  if not examples:
    return []
  graphdef, params = nnx.split(reference_model)

  @jax.jit
  def ref_logps(params, batch):
    return _policy_token_logps(nnx.merge(graphdef, params), batch)

  out = []
  keys = ('chosen_tokens', 'chosen_mask', 'rejected_tokens', 'rejected_mask')
  for start in range(0, len(examples), batch_size):
    chunk = list(examples[start : start + batch_size])
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    batch = {k: np.stack([e[k] for e in padded]) for k in keys}
    chosen, rejected = jax.device_get(ref_logps(params, batch))
    for i, e in enumerate(chunk):
      out.append({**e, 'ref_chosen_logps': chosen[i], 'ref_rejected_logps': rejected[i]})
  return out


def preference_loss_fn(
  loss_type: str = 'sigmoid',
  *,
  beta: float = 0.1,
  reference: str = 'precomputed',
  label_smoothing: float = 0.0,
  simpo_gamma: float = 0.5,
  d2po_gamma: float = 0.98,
):
  """`loss_fn(model, batch, rng[, frozen])` for the trainer.

  reference='precomputed' reads `ref_*_logps` from the batch (no frozen state); 'model' expects the
  reference params as the trainer's `frozen` argument (same architecture as the policy).
  """
  check_choice('preference.loss_type', loss_type, PREFERENCE_LOSSES)
  check_choice('preference.reference', reference, REFERENCE_SOURCES)
  if not beta > 0:
    raise ValueError(f'preference.beta must be > 0, got {beta}')

  def compute(model, batch, ref_chosen, ref_rejected):
    chosen, rejected = _policy_token_logps(model, batch)
    cm, rm = batch['chosen_mask'], batch['rejected_mask']
    if loss_type == 'd2po':
      return pref.d2po_loss(
        chosen, rejected, ref_chosen, ref_rejected, cm, rm, gamma=d2po_gamma, beta=beta
      )
    pc, lc = pref.sequence_logps(chosen, cm)
    pr, lr = pref.sequence_logps(rejected, rm)
    rc, _ = pref.sequence_logps(ref_chosen, cm)
    rr, _ = pref.sequence_logps(ref_rejected, rm)
    if loss_type == 'capo':
      return pref.capo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    return pref.dpo_loss(
      pc,
      pr,
      rc,
      rr,
      loss_type=loss_type,
      beta=beta,
      label_smoothing=label_smoothing,
      chosen_lengths=lc,
      rejected_lengths=lr,
      simpo_gamma=simpo_gamma,
    )

  if reference == 'precomputed':

    def loss_fn(model, batch, rng):
      del rng
      return compute(model, batch, batch['ref_chosen_logps'], batch['ref_rejected_logps'])

  else:

    def loss_fn(model, batch, rng, frozen):
      del rng
      ref_model = nnx.merge(nnx.graphdef(model), frozen)
      ref_chosen, ref_rejected = jax.lax.stop_gradient(_policy_token_logps(ref_model, batch))
      return compute(model, batch, ref_chosen, ref_rejected)

  return loss_fn
