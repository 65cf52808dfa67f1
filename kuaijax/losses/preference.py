"""Pairwise preference losses (DPO family, CaPO, D2PO, SPPD): pure functions over log-probs.

Every loss returns `(loss, metrics)`: `loss` is the mean over the (valid) pairs of the batch, and the
metrics are scalars: `rewards/chosen`, `rewards/rejected` (the implicit rewards, beta times the policy
minus reference log-prob of each side), `rewards/margins`, `rewards/accuracies` (fraction of pairs whose
chosen reward is strictly larger), `logps/chosen`, `logps/rejected` (policy log-probs) and `pairs`.

Sequence-level losses (`dpo_loss`, `capo_loss`) take per-sequence summed log-probs [B]; the
token-level ones (`d2po_loss`, `sppd_loss`) take per-token log-probs [B, T] and completion masks.
`sequence_logps` turns the latter into the former. Every loss takes an optional `pair_mask` [B] so
that a fixed-shape (jitted, padded) batch can hold padding pairs: they count nowhere, and a batch
without a valid pair gives loss 0 and finite metrics.

Bad input, checked at trace time (shapes are static; hyper-parameters are Python numbers): arrays that should pair up (policy vs reference, chosen vs
rejected, log-probs vs masks) with different shapes -> ValueError naming both; `beta <= 0` ->
ValueError; unknown `loss_type` -> ValueError listing the known ones; out-of-range label smoothing
or gamma -> ValueError. An empty completion (length 0 / a mask row without tokens) has summed
log-prob 0, and length-normalised variants divide by max(length, 1), so it gives a finite loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
  'DPO_LOSS_TYPES',
  'capo_loss',
  'd2po_loss',
  'd2po_token_weights',
  'dpo_loss',
  'sequence_logps',
  'sppd_loss',
]


class _Pair(NamedTuple):
  """What a DPO-family loss type sees (all [B] float32)."""

  policy_chosen: jax.Array
  policy_rejected: jax.Array
  ref_chosen: jax.Array
  ref_rejected: jax.Array
  chosen_lengths: jax.Array  # max(length, 1)
  rejected_lengths: jax.Array


_log_sigmoid = jax.nn.log_sigmoid


def _sigmoid(pair, beta, eps, gamma):
  del gamma
  d = (pair.policy_chosen - pair.ref_chosen) - (pair.policy_rejected - pair.ref_rejected)
  return -(1.0 - eps) * _log_sigmoid(beta * d) - eps * _log_sigmoid(-beta * d)


def _hinge(pair, beta, eps, gamma):
  del eps, gamma
  d = (pair.policy_chosen - pair.ref_chosen) - (pair.policy_rejected - pair.ref_rejected)
  return jax.nn.relu(1.0 - beta * d)


def _ipo(pair, beta, eps, gamma):
  del eps, gamma
  c = (pair.policy_chosen - pair.ref_chosen) / pair.chosen_lengths
  r = (pair.policy_rejected - pair.ref_rejected) / pair.rejected_lengths
  return jnp.square(c - r - 1.0 / (2.0 * beta))


def _robust(pair, beta, eps, gamma):
  del gamma
  d = (pair.policy_chosen - pair.ref_chosen) - (pair.policy_rejected - pair.ref_rejected)
  return (-(1.0 - eps) * _log_sigmoid(beta * d) + eps * _log_sigmoid(-beta * d)) / (1.0 - 2.0 * eps)


def _sigmoid_norm(pair, beta, eps, gamma):
  del eps, gamma
  c = (pair.policy_chosen - pair.ref_chosen) / pair.chosen_lengths
  r = (pair.policy_rejected - pair.ref_rejected) / pair.rejected_lengths
  return -_log_sigmoid(beta * (c - r))


def _simpo(pair, beta, eps, gamma):
  logits = beta * (
    pair.policy_chosen / pair.chosen_lengths - pair.policy_rejected / pair.rejected_lengths
  )
  logits = logits - gamma
  return -(1.0 - eps) * _log_sigmoid(logits) - eps * _log_sigmoid(-logits)


class _LossType(NamedTuple):
  fn: Callable
  needs_lengths: bool  # chosen_lengths / rejected_lengths are required
  needs_reference: bool
  max_label_smoothing: float  # label_smoothing must lie in [0, max); 0 -> no smoothing allowed


# The DPO family by name (DESIGN.md convention 3: chosen by name, not by if/elif towers).
_LOSS_TYPES: dict[str, _LossType] = {
  'sigmoid': _LossType(_sigmoid, False, True, 1.0),
  'hinge': _LossType(_hinge, False, True, 0.0),
  'ipo': _LossType(_ipo, True, True, 0.0),
  'robust': _LossType(_robust, False, True, 0.5),
  'sigmoid_norm': _LossType(_sigmoid_norm, True, True, 0.0),
  'simpo': _LossType(_simpo, True, False, 1.0),
}
DPO_LOSS_TYPES = tuple(_LOSS_TYPES)


def sequence_logps(token_logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sequence summed log-probs and completion lengths from [B, T] token log-probs and mask.

  Returns `(logps[B], lengths[B])`, both float32. Masked positions never contribute, even if they
  hold non-finite values.
  """
  check_same_shape(('token_logps', token_logps), ('mask', mask))
  m = jnp.asarray(mask).astype(bool)
  lp = jnp.where(m, jnp.asarray(token_logps, jnp.float32), 0.0)
  return lp.sum(-1), m.sum(-1).astype(jnp.float32)


def dpo_loss(
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array | None,
  ref_rejected_logps: jax.Array | None,
  *,
  loss_type: str = 'sigmoid',
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  chosen_lengths: jax.Array | None = None,
  rejected_lengths: jax.Array | None = None,
  simpo_gamma: float = 0.5,
  pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO-family loss over per-sequence summed log-probs [B], averaged over the pairs.

  With c = policy_chosen - ref_chosen, r = policy_rejected - ref_rejected, D = c - r, eps the label
  smoothing and |y| the completion lengths, the loss types are those of HF TRL v1.9.0
  (`trl/trainer/dpo_trainer.py`: sigmoid, hinge, ipo, robust, sigmoid_norm; `simpo` from
  `trl/experimental/cpo/cpo_trainer.py`), except that label-smoothed sigmoid follows TRL v0.28.0
  (v0.29 dropped the smoothing from sigmoid). tests/losses/preference_test.py re-derives them:
  - `sigmoid`: -(1-eps) log s(beta D) - eps log s(-beta D)  (conservative DPO when eps > 0);
  - `hinge`: relu(1 - beta D)  (SLiC);
  - `ipo`: (c/|y_w| - r/|y_l| - 1/(2 beta))^2  (IPO on length-averaged log-probs, as TRL does);
  - `robust`: [-(1-eps) log s(beta D) + eps log s(-beta D)] / (1 - 2 eps)  (rDPO, eps in [0, 0.5));
  - `sigmoid_norm`: -log s(beta (c/|y_w| - r/|y_l|))  (length-normalised DPO);
  - `simpo`: reference-free, -log s(beta (pi_w/|y_w| - pi_l/|y_l|) - simpo_gamma) (with smoothing
    as in TRL's CPO trainer); `ref_*` may be None and the reported rewards are beta * pi / |y|.

  Args:
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] summed
      completion log-probs; all four must have the same shape.
    loss_type: one of `DPO_LOSS_TYPES`.
    beta: inverse temperature, > 0.
    label_smoothing: eps; allowed for sigmoid and simpo (in [0, 1)) and robust (in [0, 0.5));
      must be 0 for hinge, ipo and sigmoid_norm.
    chosen_lengths, rejected_lengths: [B] completion token counts, required by ipo, sigmoid_norm
      and simpo; a length of 0 is treated as 1 (an empty completion has log-prob 0: finite loss).
    simpo_gamma: SimPO's target margin (>= 0), used only by `simpo`.
    pair_mask: optional [B] validity of each pair (padding pairs count nowhere).

  Returns:
    `(loss, metrics)` as described in the module docstring.
  """
  if loss_type not in _LOSS_TYPES:
    raise ValueError(f'dpo_loss: unknown loss_type {loss_type!r}; known: {DPO_LOSS_TYPES}')
  spec = _LOSS_TYPES[loss_type]
  _check_beta(beta)
  limit = spec.max_label_smoothing
  if (limit == 0.0 and label_smoothing != 0.0) or (
    limit > 0.0 and not 0.0 <= label_smoothing < limit
  ):
    allowed = f'[0, {limit})' if limit else '0'
    raise ValueError(
      f'dpo_loss: label_smoothing={label_smoothing} out of range for {loss_type!r} (allowed: {allowed})'
    )
  if simpo_gamma < 0:
    raise ValueError(f'dpo_loss: simpo_gamma must be >= 0, got {simpo_gamma}')
  named = [
    ('policy_chosen_logps', policy_chosen_logps),
    ('policy_rejected_logps', policy_rejected_logps),
  ]
  if spec.needs_reference or ref_chosen_logps is not None or ref_rejected_logps is not None:
    if ref_chosen_logps is None or ref_rejected_logps is None:
      raise ValueError(
        f'dpo_loss: loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps'
      )
    named += [('ref_chosen_logps', ref_chosen_logps), ('ref_rejected_logps', ref_rejected_logps)]
  if spec.needs_lengths and (chosen_lengths is None or rejected_lengths is None):
    raise ValueError(f'dpo_loss: loss_type {loss_type!r} needs chosen_lengths and rejected_lengths')
  for name, arr in (('chosen_lengths', chosen_lengths), ('rejected_lengths', rejected_lengths)):
    if arr is not None:
      named.append((name, arr))
  if pair_mask is not None:
    named.append(('pair_mask', pair_mask))
  check_same_shape(*named)
  if jnp.ndim(policy_chosen_logps) != 1:
    raise ValueError(
      f'dpo_loss: expected per-sequence log-probs of shape [B], got {jnp.shape(policy_chosen_logps)}'
    )

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
  rc = f32(ref_chosen_logps) if ref_chosen_logps is not None else jnp.zeros_like(pc)
  rr = f32(ref_rejected_logps) if ref_rejected_logps is not None else jnp.zeros_like(pr)
  ones = jnp.ones_like(pc)
  lc = jnp.maximum(f32(chosen_lengths), 1.0) if chosen_lengths is not None else ones
  lr = jnp.maximum(f32(rejected_lengths), 1.0) if rejected_lengths is not None else ones
  pc, pr, rc, rr = _zero_padding(pair_mask, pc, pr, rc, rr)
  pair = _Pair(pc, pr, rc, rr, lc, lr)
  losses = spec.fn(pair, beta, label_smoothing, simpo_gamma)
  if loss_type == 'simpo':
    chosen_rewards, rejected_rewards = beta * pc / lc, beta * pr / lr
  else:
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
  return _reduce(losses, chosen_rewards, rejected_rewards, pc, pr, pair_mask)


def capo_loss(
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CaPO (Parrot, arXiv 2310.07301): standard sigmoid DPO on context-aware pairs.

  The objective is exactly `dpo_loss(..., loss_type='sigmoid')`; what makes it CaPO is the data:
  for a context-dependent query, chosen = the full-history answer, rejected = an answer with a
  context error (neglect / hallucination / misunderstanding of the history). The prompt is the whole
  history plus the current query and only the final assistant turn is scored (mask the rest when
  computing the log-probs); the SFT model is the reference. beta is not reported in the paper:
  0.1 is our default.
  """
  return dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    loss_type='sigmoid',
    beta=beta,
    label_smoothing=label_smoothing,
    pair_mask=pair_mask,
  )


def d2po_token_weights(mask: jax.Array, gamma: float) -> jax.Array:
  """D2PO temporal-decay weights [B, T]: gamma^(completion tokens up to and including t), 0 off-mask.

  The first completion token gets gamma^1, whatever the number of padding/prompt positions before it.
  """
  _check_gamma_unit(gamma, 'd2po_token_weights')
  m = jnp.asarray(mask).astype(bool)
  count = jnp.cumsum(m.astype(jnp.float32), axis=-1)
  return jnp.where(m, jnp.power(jnp.float32(gamma), count), 0.0)


def d2po_loss(
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  chosen_mask: jax.Array,
  rejected_mask: jax.Array,
  *,
  gamma: float = 0.98,
  beta: float = 0.1,
  pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """D2PO (arXiv 2502.14340): sigmoid DPO on temporally decayed sequence log-probs.

  Over per-token log-probs [B, T] (chosen and rejected may have different T) and completion masks:
  S(y) = sum_t m_t gamma^(n_t) logp_t with n_t the number of completion tokens up to and including t,
  for the policy AND the reference; then loss = -log s(beta [(S_pi(y_w) - S_ref(y_w)) -
  (S_pi(y_l) - S_ref(y_l))]). gamma = 1 is exactly DPO (sigmoid) on summed log-probs.

  gamma must lie in (0, 1] (ValueError otherwise); beta > 0. The reported rewards and log-probs
  are the decayed ones. An empty completion has S = 0.
  """
  _check_gamma_unit(gamma, 'd2po_loss')
  _check_beta(beta)
  check_same_shape(
    ('policy_chosen_logps', policy_chosen_logps),
    ('ref_chosen_logps', ref_chosen_logps),
    ('chosen_mask', chosen_mask),
  )
  check_same_shape(
    ('policy_rejected_logps', policy_rejected_logps),
    ('ref_rejected_logps', ref_rejected_logps),
    ('rejected_mask', rejected_mask),
  )
  _check_batch(policy_chosen_logps, policy_rejected_logps, pair_mask, 'd2po_loss')
  wc = d2po_token_weights(chosen_mask, gamma)
  wr = d2po_token_weights(rejected_mask, gamma)
  s = lambda lp, w: (jnp.where(w > 0, jnp.asarray(lp, jnp.float32), 0.0) * w).sum(-1)
  pc, rc = s(policy_chosen_logps, wc), s(ref_chosen_logps, wc)
  pr, rr = s(policy_rejected_logps, wr), s(ref_rejected_logps, wr)
  return dpo_loss(pc, pr, rc, rr, loss_type='sigmoid', beta=beta, pair_mask=pair_mask)


def sppd_loss(
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  chosen_mask: jax.Array,
  rejected_mask: jax.Array,
  chosen_values: jax.Array,
  rejected_values: jax.Array,
  *,
  beta: float = 0.1,
  gamma: float = 1.0,
  pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SPPD (arXiv 2502.13516): step-level DPO with a dynamic value margin.

  Each pair is two sibling steps a_w, a_l after the same prefix s_t. The [B, T] per-token log-probs
  with masks selecting the STEP tokens give h = [pi(a_w) - ref(a_w)] - [pi(a_l) - ref(a_l)] (step
  log-probs summed over the step's tokens), and
      loss = -log s(beta h - gamma (V(s^w_{t+1}) - V(s^l_{t+1})))
  with chosen_values / rejected_values [B] the process-reward-model values of the states after each
  step (in [0, 1]; not checked, they may be traced). A larger value gap demands a larger log-ratio
  margin. gamma = 0 is Step-DPO, i.e. `dpo_loss(loss_type='sigmoid')` on the step sums.

  gamma must be finite and >= 0 and beta > 0 (ValueError otherwise). Metrics add `value_margin`
  (mean V_w - V_l).
  """
  if not (gamma >= 0.0 and math.isfinite(gamma)):
    raise ValueError(f'sppd_loss: gamma must be finite and >= 0, got {gamma}')
  _check_beta(beta)
  check_same_shape(
    ('policy_chosen_logps', policy_chosen_logps),
    ('ref_chosen_logps', ref_chosen_logps),
    ('chosen_mask', chosen_mask),
  )
  check_same_shape(
    ('policy_rejected_logps', policy_rejected_logps),
    ('ref_rejected_logps', ref_rejected_logps),
    ('rejected_mask', rejected_mask),
  )
  _check_batch(policy_chosen_logps, policy_rejected_logps, pair_mask, 'sppd_loss')
  check_same_shape(('chosen_values', chosen_values), ('rejected_values', rejected_values))
  if jnp.shape(chosen_values) != jnp.shape(policy_chosen_logps)[:1]:
    raise ValueError(
      f'sppd_loss: chosen_values shape {jnp.shape(chosen_values)} != batch '
      f'{jnp.shape(policy_chosen_logps)[:1]}'
    )
  pc, _ = sequence_logps(policy_chosen_logps, chosen_mask)
  rc, _ = sequence_logps(ref_chosen_logps, chosen_mask)
  pr, _ = sequence_logps(policy_rejected_logps, rejected_mask)
  rr, _ = sequence_logps(ref_rejected_logps, rejected_mask)
  value_margin = jnp.asarray(chosen_values, jnp.float32) - jnp.asarray(rejected_values, jnp.float32)
  pc, pr, rc, rr, value_margin = _zero_padding(pair_mask, pc, pr, rc, rr, value_margin)
  h = (pc - rc) - (pr - rr)
  losses = -_log_sigmoid(beta * h - gamma * value_margin)
  loss, metrics = _reduce(losses, beta * (pc - rc), beta * (pr - rr), pc, pr, pair_mask)
  metrics['value_margin'] = _masked_mean(value_margin, _pair_weights(pair_mask, pc))
  return loss, metrics


# ----------------------------------------------------------------------------- helpers


def _pair_weights(pair_mask, like):
  if pair_mask is None:
    return jnp.ones_like(like)
  return jnp.asarray(pair_mask).astype(jnp.float32)


def _zero_padding(pair_mask, *arrays):
  """Zeros in padding pairs BEFORE any arithmetic, so garbage there cannot reach the gradients."""
  if pair_mask is None:
    return arrays
  valid = jnp.asarray(pair_mask) > 0
  return tuple(jnp.where(valid, x, 0.0) for x in arrays)


def _masked_mean(x, w):
  return (x * w).sum() / jnp.maximum(w.sum(), 1.0)


def _reduce(losses, chosen_rewards, rejected_rewards, pc, pr, pair_mask):
  w = _pair_weights(pair_mask, losses)
  clean = lambda x: jnp.where(w > 0, x, 0.0)
  margins = chosen_rewards - rejected_rewards
  metrics = {
    'rewards/chosen': _masked_mean(clean(chosen_rewards), w),
    'rewards/rejected': _masked_mean(clean(rejected_rewards), w),
    'rewards/margins': _masked_mean(clean(margins), w),
    'rewards/accuracies': _masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), w),
    'logps/chosen': _masked_mean(clean(pc), w),
    'logps/rejected': _masked_mean(clean(pr), w),
    'pairs': w.sum(),
  }
  return _masked_mean(clean(losses), w), metrics


def _check_beta(beta):
  if not beta > 0:
    raise ValueError(f'beta must be > 0, got {beta}')


def _check_gamma_unit(gamma, where):
  if not 0.0 < gamma <= 1.0:
    raise ValueError(f'{where}: gamma must lie in (0, 1], got {gamma}')


def check_same_shape(*named):
  """Raises a ValueError naming both arrays when any of the (name, array) pairs differ in shape."""
  (first_name, first), *rest = named
  for name, arr in rest:
    if jnp.shape(arr) != jnp.shape(first):
      raise ValueError(
        f'shape mismatch: {first_name} has shape {jnp.shape(first)} but {name} has {jnp.shape(arr)}'
      )


def _check_batch(chosen, rejected, pair_mask, where):
  if jnp.ndim(chosen) != 2 or jnp.ndim(rejected) != 2:
    raise ValueError(
      f'{where}: expected per-token log-probs [B, T], got {jnp.shape(chosen)} and {jnp.shape(rejected)}'
    )
  if jnp.shape(chosen)[0] != jnp.shape(rejected)[0]:
    raise ValueError(
      f'{where}: chosen batch {jnp.shape(chosen)[0]} != rejected batch {jnp.shape(rejected)[0]}'
    )
  if pair_mask is not None and jnp.shape(pair_mask) != jnp.shape(chosen)[:1]:
    raise ValueError(f'{where}: pair_mask shape {jnp.shape(pair_mask)} != [{jnp.shape(chosen)[0]}]')
