"""DPO family, CaPO, D2PO and SPPD against closed forms, TRL's formulas and hand-derived gradients.

The DPO goldens re-derive, in plain numpy, the per-sequence formulas of HF TRL v1.9.0
(`trl/trainer/dpo_trainer.py` `_compute_loss`: sigmoid, hinge, ipo, robust, sigmoid_norm;
`trl/experimental/cpo/cpo_trainer.py` `cpo_loss`: simpo) and the label-smoothed sigmoid of TRL
v0.28.0 (`DPOTrainer.dpo_loss`; v0.29 removed the smoothing from sigmoid). TRL is not installed:
the formulas were read from those releases' sources and are written out below.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kuaijax.losses import preference
from kuaijax.losses.preference import (
  DPO_LOSS_TYPES,
  d2po_token_weights,
  sequence_logps,
)

# Shared golden inputs: summed completion log-probs and completion lengths of 4 pairs.
PC = np.array([-12.0, -30.5, -7.25, -50.0])
PR = np.array([-15.0, -28.0, -9.0, -49.0])
RC = np.array([-13.0, -31.0, -7.0, -52.0])
RR = np.array([-14.0, -27.5, -10.0, -47.5])
LC = np.array([6.0, 20.0, 3.0, 40.0])
LR = np.array([8.0, 17.0, 5.0, 33.0])


def _logsig(x):
  return -np.logaddexp(0.0, -x)


def _trl_losses(loss_type, beta, eps, gamma):
  """Per-pair losses as TRL computes them (see the module docstring for the releases)."""
  chosen_scores, rejected_scores = PC - RC, PR - RR
  delta = chosen_scores - rejected_scores
  if loss_type == 'sigmoid':  # v0.28.0 (eps = 0: also v1.9.0)
    return -_logsig(beta * delta) * (1 - eps) - _logsig(-beta * delta) * eps
  if loss_type == 'hinge':
    return np.maximum(0.0, 1 - beta * delta)
  if loss_type == 'ipo':
    ipo_delta = chosen_scores / np.maximum(LC, 1) - rejected_scores / np.maximum(LR, 1)
    return (ipo_delta - 1 / (2 * beta)) ** 2
  if loss_type == 'robust':
    clean = -(1 - eps) * _logsig(beta * delta)
    flipped = -eps * _logsig(-beta * delta)
    return (clean - flipped) / (1 - 2 * eps)
  if loss_type == 'sigmoid_norm':
    d = chosen_scores / np.maximum(LC, 1) - rejected_scores / np.maximum(LR, 1)
    return -_logsig(beta * d)
  if loss_type == 'simpo':  # CPO trainer: average log-probs, logits - gamma / beta
    logits = PC / LC - PR / LR - gamma / beta
    return -_logsig(beta * logits) * (1 - eps) - _logsig(-beta * logits) * eps
  raise AssertionError(loss_type)


@pytest.mark.parametrize(
  'loss_type,beta,eps',
  [
    ('sigmoid', 0.1, 0.0),
    ('sigmoid', 0.5, 0.2),
    ('hinge', 0.3, 0.0),
    ('ipo', 0.1, 0.0),
    ('robust', 0.2, 0.1),
    ('sigmoid_norm', 2.0, 0.0),
    ('simpo', 2.0, 0.0),
    ('simpo', 2.5, 0.1),
  ],
)
def test_dpo_variants_match_trl(loss_type, beta, eps):
  gamma = 0.7
  loss, metrics = dpo_loss(
    PC,
    PR,
    RC,
    RR,
    loss_type=loss_type,
    beta=beta,
    label_smoothing=eps,
    chosen_lengths=LC,
    rejected_lengths=LR,
    simpo_gamma=gamma,
  )
  expected = _trl_losses(loss_type, beta, eps, gamma)
  np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-5)
  if loss_type == 'simpo':  # CPO logs beta * average log-prob
    chosen, rejected = beta * PC / LC, beta * PR / LR
  else:  # DPO logs beta * (policy - reference)
    chosen, rejected = beta * (PC - RC), beta * (PR - RR)
  np.testing.assert_allclose(float(metrics['rewards/chosen']), chosen.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['rewards/rejected']), rejected.mean(), rtol=1e-5)
  np.testing.assert_allclose(
    float(metrics['rewards/margins']), (chosen - rejected).mean(), rtol=1e-5
  )
  assert float(metrics['rewards/accuracies']) == pytest.approx(np.mean(chosen > rejected))
  assert float(metrics['logps/chosen']) == pytest.approx(PC.mean())


def test_dpo_closed_forms_and_registry():
  assert set(DPO_LOSS_TYPES) == {'sigmoid', 'hinge', 'ipo', 'robust', 'sigmoid_norm', 'simpo'}
  zero = jnp.zeros(1)
  # Policy == reference: D = 0, so sigmoid gives log 2, hinge 1, ipo 1/(2 beta)^2.
  assert float(dpo_loss(zero, zero, zero, zero)[0]) == pytest.approx(math.log(2.0))
  assert float(dpo_loss(zero, zero, zero, zero, loss_type='hinge')[0]) == pytest.approx(1.0)
  one = jnp.ones(1)
  ipo = dpo_loss(
    zero, zero, zero, zero, loss_type='ipo', beta=0.25, chosen_lengths=one, rejected_lengths=one
  )[0]
  assert float(ipo) == pytest.approx(4.0)
  # D = 10, beta = 0.1: hinge relu(1 - 1) = 0, sigmoid log(1 + e^-1).
  ten = jnp.array([10.0])
  assert float(dpo_loss(ten, zero, zero, zero, loss_type='hinge')[0]) == pytest.approx(0.0)
  assert float(dpo_loss(ten, zero, zero, zero)[0]) == pytest.approx(math.log1p(math.exp(-1.0)))


def test_dpo_sigmoid_gradient():
  beta = 0.3
  grads = jax.grad(lambda pc, pr: dpo_loss(pc, pr, RC, RR, beta=beta)[0], argnums=(0, 1))(
    jnp.asarray(PC), jnp.asarray(PR)
  )
  delta = (PC - RC) - (PR - RR)
  # d/dD -log s(beta D) = -beta s(-beta D); mean over B pairs.
  expected = -beta / (1 + np.exp(beta * delta)) / len(PC)
  np.testing.assert_allclose(grads[0], expected, rtol=1e-5)
  np.testing.assert_allclose(grads[1], -expected, rtol=1e-5)


def test_capo_is_sigmoid_dpo():
  capo, capo_metrics = capo_loss(PC, PR, RC, RR, label_smoothing=0.1)
  dpo, dpo_metrics = dpo_loss(PC, PR, RC, RR, loss_type='sigmoid', beta=0.1, label_smoothing=0.1)
  assert float(capo) == float(dpo)
  assert capo_metrics.keys() == dpo_metrics.keys()


def test_pair_mask_and_empty_completions_are_finite():
  pc = jnp.array([-3.0, jnp.inf])  # the padding pair holds garbage
  pr = jnp.array([-4.0, jnp.nan])
  ref = jnp.array([-3.5, 0.0])
  mask = jnp.array([1.0, 0.0])
  loss, metrics = dpo_loss(pc, pr, ref, ref, pair_mask=mask)
  first, _ = dpo_loss(pc[:1], pr[:1], ref[:1], ref[:1])
  assert float(loss) == pytest.approx(float(first))
  assert float(metrics['pairs']) == 1.0
  grad = jax.grad(lambda x: dpo_loss(x, pr, ref, ref, pair_mask=mask)[0])(pc)
  assert np.all(np.isfinite(grad)) and float(grad[1]) == 0.0
  # No valid pair at all: loss 0, metrics finite.
  loss, metrics = dpo_loss(pc, pr, ref, ref, pair_mask=jnp.zeros(2))
  assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in metrics.values())
  # Empty completions: log-prob 0 and length 0 (treated as 1) give finite length-normalised losses.
  z = jnp.zeros(1)
  for loss_type in ('ipo', 'sigmoid_norm', 'simpo'):
    loss, _ = dpo_loss(z, z, z, z, loss_type=loss_type, chosen_lengths=z, rejected_lengths=z)
    assert np.isfinite(float(loss))
  logps, lengths = sequence_logps(jnp.full((1, 3), jnp.nan), jnp.zeros((1, 3)))
  assert float(logps[0]) == 0.0 and float(lengths[0]) == 0.0


def test_dpo_bad_input():
  with pytest.raises(ValueError, match='shape mismatch.*ref_chosen_logps'):
    dpo_loss(PC, PR, RC[:3], RR)
  with pytest.raises(ValueError, match='unknown loss_type'):
    dpo_loss(PC, PR, RC, RR, loss_type='kto')
  with pytest.raises(ValueError, match='beta must be > 0'):
    dpo_loss(PC, PR, RC, RR, beta=0.0)
  with pytest.raises(ValueError, match='label_smoothing'):
    dpo_loss(PC, PR, RC, RR, loss_type='robust', label_smoothing=0.5)
  with pytest.raises(ValueError, match='label_smoothing'):
    dpo_loss(PC, PR, RC, RR, loss_type='hinge', label_smoothing=0.1)
  with pytest.raises(ValueError, match='needs chosen_lengths'):
    dpo_loss(PC, PR, RC, RR, loss_type='ipo')
  with pytest.raises(ValueError, match='needs ref_chosen_logps'):
    dpo_loss(PC, PR, None, None)
  with pytest.raises(ValueError, match='simpo_gamma'):
    dpo_loss(
      PC, PR, None, None, loss_type='simpo', chosen_lengths=LC, rejected_lengths=LR, simpo_gamma=-1
    )
  with pytest.raises(ValueError, match=r'shape \[B\]'):
    dpo_loss(PC[None], PR[None], RC[None], RR[None])
  # SimPO is reference-free: no reference needed.
  loss, _ = dpo_loss(PC, PR, None, None, loss_type='simpo', chosen_lengths=LC, rejected_lengths=LR)
  assert np.isfinite(float(loss))


def _jitted(fn):
  """Call `fn` under jit, non-array arguments static: one compilation per call, not one per op."""

  def call(*args, **kwargs):
    is_array = [isinstance(x, (np.ndarray, jax.Array)) for x in args]

    def inner(*arrays):
      it = iter(arrays)
      return fn(*[next(it) if flag else x for x, flag in zip(args, is_array)], **kwargs)

    return jax.jit(inner)(*[x for x, flag in zip(args, is_array) if flag])

  return functools.wraps(fn)(call)


capo_loss = _jitted(preference.capo_loss)
d2po_loss = _jitted(preference.d2po_loss)
dpo_loss = _jitted(preference.dpo_loss)
sppd_loss = _jitted(preference.sppd_loss)

# ----------------------------------------------------------------------------- D2PO

TOK_PC = np.array([[0.0, -1.0, -2.0, -0.5], [-0.2, -0.3, 0.0, 0.0]])
TOK_RC = np.array([[0.0, -1.5, -1.0, -0.5], [-0.4, -0.1, 0.0, 0.0]])
CMASK = np.array(
  [[0, 1, 1, 1], [1, 1, 0, 0]], np.float32
)  # row 0: one prompt/padding position first
TOK_PR = np.array([[-3.0, -1.0, -4.0], [-0.1, -2.0, -1.0]])
TOK_RR = np.array([[-2.0, -2.0, -2.0], [-0.1, -1.0, -1.0]])
RMASK = np.array([[1, 1, 0], [1, 1, 1]], np.float32)


def test_d2po_weights_and_closed_form():
  w = d2po_token_weights(CMASK, 0.5)
  np.testing.assert_allclose(w, [[0, 0.5, 0.25, 0.125], [0.5, 0.25, 0, 0]])
  gamma, beta = 0.5, 0.2
  loss, metrics = d2po_loss(TOK_PC, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK, gamma=gamma, beta=beta)
  # Hand sums: chosen policy row 0 = .5*-1 + .25*-2 + .125*-.5 = -1.0625, reference -1.0625 ...
  s = lambda lp, m: (lp * d2po_token_weights(m, gamma)).sum(-1)
  s_pc = np.array([-1.0625, -0.175])
  s_rc = np.array([-1.0625, -0.225])
  s_pr = np.array([-1.75, -0.675])
  s_rr = np.array([-1.5, -0.425])
  np.testing.assert_allclose(s(TOK_PC, CMASK), s_pc, rtol=1e-6)
  np.testing.assert_allclose(s(TOK_RC, CMASK), s_rc, rtol=1e-6)
  np.testing.assert_allclose(s(TOK_PR, RMASK), s_pr, rtol=1e-6)
  np.testing.assert_allclose(s(TOK_RR, RMASK), s_rr, rtol=1e-6)
  delta = (s_pc - s_rc) - (s_pr - s_rr)
  np.testing.assert_allclose(float(loss), np.mean(-_logsig(beta * delta)), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['rewards/margins']), np.mean(beta * delta), rtol=1e-5)


def test_d2po_gamma_one_is_dpo_and_gradient():
  d2po = lambda pc: d2po_loss(pc, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK, gamma=1.0, beta=0.3)[0]

  def dpo(pc):
    sums = [sequence_logps(x, m)[0] for x, m in ((pc, CMASK), (TOK_PR, RMASK))]
    refs = [sequence_logps(x, m)[0] for x, m in ((TOK_RC, CMASK), (TOK_RR, RMASK))]
    return dpo_loss(sums[0], sums[1], refs[0], refs[1], beta=0.3)[0]

  pc = jnp.asarray(TOK_PC)
  assert float(d2po(pc)) == pytest.approx(float(dpo(pc)), rel=1e-6)
  np.testing.assert_allclose(jax.grad(d2po)(pc), jax.grad(dpo)(pc), rtol=1e-6)
  # gamma < 1: d loss / d logp_t = -beta s(-beta D) gamma^(n_t) m_t / B on the chosen side.
  gamma, beta = 0.8, 0.3
  f = lambda pc: d2po_loss(pc, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK, gamma=gamma, beta=beta)[0]
  wc, wr = (np.asarray(d2po_token_weights(m, gamma)) for m in (CMASK, RMASK))
  delta = ((TOK_PC - TOK_RC) * wc).sum(-1) - ((TOK_PR - TOK_RR) * wr).sum(-1)
  expected = (-beta / (1 + np.exp(beta * delta)) / 2)[:, None] * wc
  np.testing.assert_allclose(jax.grad(f)(pc), expected, rtol=1e-5, atol=1e-7)


def test_d2po_bad_input():
  args = (TOK_PC, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK)
  for gamma in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match='gamma must lie in'):
      d2po_loss(*args, gamma=gamma)
  with pytest.raises(ValueError, match='beta'):
    d2po_loss(*args, beta=-1.0)
  with pytest.raises(ValueError, match='shape mismatch'):
    d2po_loss(TOK_PC, TOK_PR, TOK_RC[:, :3], TOK_RR, CMASK, RMASK)
  with pytest.raises(ValueError, match='batch'):
    d2po_loss(TOK_PC, TOK_PR[:1], TOK_RC, TOK_RR[:1], CMASK, RMASK[:1])
  # Completions without tokens: S = 0 on both sides, loss log 2.
  loss, _ = d2po_loss(*args[:4], np.zeros_like(CMASK), np.zeros_like(RMASK))
  assert float(loss) == pytest.approx(math.log(2.0))


# ----------------------------------------------------------------------------- SPPD


def test_sppd_closed_form_and_step_dpo():
  vw, vl = np.array([0.9, 0.7]), np.array([0.1, 0.6])
  beta, gamma = 0.5, 2.0
  loss, metrics = sppd_loss(
    TOK_PC, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK, vw, vl, beta=beta, gamma=gamma
  )
  # Step sums by hand: chosen policy [-3.5, -0.5], ref [-3.0, -0.5]; rejected [-4, -3.1], [-4, -2.1].
  h = np.array([(-3.5 + 3.0) - (-4.0 + 4.0), (-0.5 + 0.5) - (-3.1 + 2.1)])
  expected = -_logsig(beta * h - gamma * (vw - vl))
  np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-6)
  assert float(metrics['value_margin']) == pytest.approx(np.mean(vw - vl))
  # A larger value gap demands a larger margin: the loss grows with it.
  bigger, _ = sppd_loss(TOK_PC, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK, vw + 0.1, vl, gamma=gamma)
  smaller, _ = sppd_loss(TOK_PC, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK, vw, vl, gamma=gamma)
  assert float(bigger) > float(smaller)
  # gamma = 0 is Step-DPO: sigmoid DPO on the step sums, values ignored.
  step_dpo = lambda pc: sppd_loss(pc, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK, vw, vl, gamma=0.0)[0]

  def dpo(pc):
    pcs, prs = sequence_logps(pc, CMASK)[0], sequence_logps(TOK_PR, RMASK)[0]
    rcs, rrs = sequence_logps(TOK_RC, CMASK)[0], sequence_logps(TOK_RR, RMASK)[0]
    return dpo_loss(pcs, prs, rcs, rrs)[0]

  pc = jnp.asarray(TOK_PC)
  assert float(step_dpo(pc)) == pytest.approx(float(dpo(pc)), rel=1e-6)
  np.testing.assert_allclose(jax.grad(step_dpo)(pc), jax.grad(dpo)(pc), rtol=1e-6)
  # Gradient w.r.t. the chosen step tokens: -beta s(-(beta h - gamma dV)) m_t / B.
  f = lambda pc: sppd_loss(
    pc, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK, vw, vl, beta=beta, gamma=gamma
  )[0]
  z = beta * h - gamma * (vw - vl)
  expected = (-beta / (1 + np.exp(z)) / 2)[:, None] * CMASK
  np.testing.assert_allclose(jax.grad(f)(pc), expected, rtol=1e-5, atol=1e-7)


def test_sppd_bad_input():
  args = (TOK_PC, TOK_PR, TOK_RC, TOK_RR, CMASK, RMASK)
  v = np.array([0.5, 0.5])
  with pytest.raises(ValueError, match='gamma must be finite and >= 0'):
    sppd_loss(*args, v, v, gamma=-1.0)
  with pytest.raises(ValueError, match='gamma must be finite'):
    sppd_loss(*args, v, v, gamma=math.inf)
  with pytest.raises(ValueError, match='beta'):
    sppd_loss(*args, v, v, beta=0.0)
  with pytest.raises(ValueError, match='chosen_values'):
    sppd_loss(*args, v[:1], v[:1])
  with pytest.raises(ValueError, match='shape mismatch'):
    sppd_loss(*args, v, v[:1])
