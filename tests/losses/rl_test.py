"""RLMEC and GRPO (+ variants) against closed forms and hand-derived gradients."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kuaijax.losses import rl
from kuaijax.losses.rl import (
  LengthReward,
  inject_offline_samples,
  sample_filter,
)


def _jitted(fn):
  """Call `fn` under jit, non-array arguments static: one compilation per call, not one per op."""

  def call(*args, **kwargs):
    is_array = [isinstance(x, (np.ndarray, jax.Array)) for x in args]

    def inner(*arrays):
      it = iter(arrays)
      return fn(*[next(it) if flag else x for x, flag in zip(args, is_array)], **kwargs)

    return jax.jit(inner)(*[x for x, flag in zip(args, is_array) if flag])

  return functools.wraps(fn)(call)


grpo_advantages = _jitted(rl.grpo_advantages)
grpo_loss = _jitted(rl.grpo_loss)
grpo_process_rewards = _jitted(rl.grpo_process_rewards)
relative_length_reward = _jitted(rl.relative_length_reward)
rlmec_loss = _jitted(rl.rlmec_loss)
rlmec_token_rewards = _jitted(rl.rlmec_token_rewards)
zero_advantage_fraction = _jitted(rl.zero_advantage_fraction)

# ----------------------------------------------------------------------------- RLMEC

LOGPS = np.array([[-1.0, -0.5, -2.0, -0.1], [-0.3, -0.7, -1.2, -9.0]])
# rho = exp(l - l_old): row 0 -> [e^0.5, 1, e^-0.5, 1]; row 1 -> [1, e^0.2, e^-1, .]
OLD = np.array([[-1.5, -0.5, -1.5, -0.1], [-0.3, -0.9, -0.2, 0.0]])
REWARDS = np.array([[0.4, 0.0, -0.05, 0.2], [-0.1, 0.3, 0.25, 0.5]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)  # last token of row 1 is padding
IM_LOGPS = np.array([[-0.2, -1.0, -3.0], [-0.5, -0.4, 0.0]])
IM_W = np.array([[1.0, 0.5, 0.5], [0.5, 1.0, 0.0]])
IM_MASK = np.array([[1, 1, 1], [1, 1, 0]], np.float32)


def _rlmec_weights(eps):
  """w_t from the spec's closed form: r > 0 -> r min(rho, 1+eps); r < 0 -> r max(rho, 1-eps)."""
  rho = np.exp(LOGPS - OLD)
  w = np.where(REWARDS > 0, REWARDS * np.minimum(rho, 1 + eps), REWARDS * np.maximum(rho, 1 - eps))
  return w * MASK


def test_rlmec_closed_form_and_gradients():
  eps, lam = 0.3, 0.7
  loss, metrics = rlmec_loss(LOGPS, OLD, REWARDS, MASK, IM_LOGPS, IM_W, IM_MASK, eps=eps, lam=lam)
  w = _rlmec_weights(eps)
  n_r = 6  # masked tokens with r != 0: row 0 has 3, row 1 has 3 (the padded 0.5 does not count)
  n_v = 5
  rl = -(w * LOGPS).sum() / n_r
  im = (IM_W * -IM_LOGPS * IM_MASK).sum() / n_v
  assert float(metrics['n_r']) == n_r and float(metrics['n_v']) == n_v
  np.testing.assert_allclose(float(metrics['rl_loss']), rl, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['imitation_loss']), im, rtol=1e-6)
  np.testing.assert_allclose(float(loss), rl + lam * im, rtol=1e-6)
  # Clipped: [0, 0] (r > 0, rho = e^.5 > 1.3) and [0, 2] (r < 0, rho = e^-.5 < .7); [1, 2] has
  # r > 0 and rho = e^-1 < 1, which the clip does not touch.
  assert float(metrics['clip_fraction']) == pytest.approx(2 / 6)
  grads = jax.grad(
    lambda lp, ilp: rlmec_loss(lp, OLD, REWARDS, MASK, ilp, IM_W, IM_MASK, eps=eps, lam=lam)[0],
    argnums=(0, 1),
  )(jnp.asarray(LOGPS), jnp.asarray(IM_LOGPS))
  np.testing.assert_allclose(grads[0], -w / n_r, rtol=1e-6, atol=1e-8)  # -w grad(logp) / N_r
  np.testing.assert_allclose(grads[1], -lam * IM_W * IM_MASK / n_v, rtol=1e-6)


def test_rlmec_clip_cases():
  # Single tokens: r > 0 caps rho at 1+eps, r < 0 floors it at 1-eps; the other side is unclipped.
  def weight(logp, old, r):
    _, m = rlmec_loss(
      np.array([[logp]]), np.array([[old]]), np.array([[r]]), np.ones((1, 1)), None, None, None
    )
    return float(m['weight_mean'])

  assert weight(0.0, -1.0, 0.5) == pytest.approx(0.5 * 1.3)
  assert weight(-1.0, 0.0, 0.5) == pytest.approx(0.5 * math.exp(-1.0))
  assert weight(-1.0, 0.0, -0.1) == pytest.approx(-0.1 * 0.7)
  assert weight(0.0, -1.0, -0.1) == pytest.approx(-0.1 * math.e)


def test_rlmec_empty_reward_set_is_finite():
  zeros = np.zeros_like(REWARDS)
  loss, metrics = rlmec_loss(LOGPS, OLD, zeros, MASK, IM_LOGPS, IM_W, IM_MASK)
  assert float(metrics['n_r']) == 0.0 and float(metrics['rl_loss']) == 0.0
  assert np.isfinite(float(loss))
  grad = jax.grad(lambda lp: rlmec_loss(lp, OLD, zeros, MASK, None, None, None)[0])(LOGPS)
  assert np.all(grad == 0.0)
  # No imitation tokens either, and garbage under the masks: still finite.
  lp = np.where(MASK > 0, LOGPS, np.nan)
  loss, _ = rlmec_loss(lp, OLD, REWARDS, MASK, IM_LOGPS, IM_W, np.zeros_like(IM_MASK))
  assert np.isfinite(float(loss))


def test_rlmec_bad_input():
  with pytest.raises(ValueError, match='shape mismatch.*old_logps'):
    rlmec_loss(LOGPS, OLD[:, :3], REWARDS, MASK, None, None, None)
  with pytest.raises(ValueError, match='imitation_weights'):
    rlmec_loss(LOGPS, OLD, REWARDS, MASK, IM_LOGPS, IM_W[:, :2], IM_MASK)
  with pytest.raises(ValueError, match='all given or all None'):
    rlmec_loss(LOGPS, OLD, REWARDS, MASK, IM_LOGPS, None, IM_MASK)
  with pytest.raises(ValueError, match='eps'):
    rlmec_loss(LOGPS, OLD, REWARDS, MASK, None, None, None, eps=1.0)
  with pytest.raises(ValueError, match='lam'):
    rlmec_loss(LOGPS, OLD, REWARDS, MASK, None, None, None, lam=-1.0)


def test_rlmec_token_rewards():
  p = np.array([[0.9, 0.55, 0.3, 0.45], [0.9, 1.0, 0.2, 0.7]])
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  r = rlmec_token_rewards(p, np.array([False, True]), mask)
  np.testing.assert_allclose(r, [[0.0, 0.0, -0.1, -0.05], [0.4, 0.5, 0.0, 0.0]], atol=1e-7)


# ----------------------------------------------------------------------------- GRPO: groups


def test_grpo_advantages_closed_form():
  rewards = jnp.array([1.0, 0.0, 1.0, 1.0, 0.3, 0.3, 0.3, 0.3])
  adv = grpo_advantages(rewards, 4)
  # Group 0: mean .75, unbiased std sqrt((3 * .0625 + .5625) / 3) = .5.
  np.testing.assert_allclose(adv[:4], np.array([0.25, -0.75, 0.25, 0.25]) / (0.5 + 1e-6), rtol=1e-6)
  assert np.all(np.asarray(adv[4:]) == 0.0)  # all-equal group: exactly zero
  assert float(zero_advantage_fraction(rewards, 4)) == 0.5
  with pytest.raises(ValueError, match='group_size must be >= 2'):
    grpo_advantages(rewards, 1)
  with pytest.raises(ValueError, match='multiple of group_size=3'):
    grpo_advantages(rewards, 3)


def test_relative_length_reward():
  rewards = jnp.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
  correct = rewards > 0
  lengths = jnp.array([100, 300, 800, 50, 100, 10, 10, 10])
  cfg = LengthReward(tau=0.5, l_base=1000.0, low=-0.2, high=0.5)
  out = relative_length_reward(rewards, correct, lengths, 4, cfg)
  # Group 0 (accuracy .75 >= .5): mean correct length 400 -> bonuses .3, .1, clip(-.4) = -.2.
  np.testing.assert_allclose(out[:4], [1.3, 1.1, 0.8, 0.0], rtol=1e-6)
  # Group 1 (accuracy .25 < .5): unchanged.
  np.testing.assert_allclose(out[4:], rewards[4:])
  with pytest.raises(ValueError, match='l_base'):
    LengthReward(l_base=0.0)


def test_filters_apply_after_full_group_advantages():
  rewards = jnp.array([1.0, 0.0, 0.0, 0.0])
  correct = rewards > 0
  full = grpo_advantages(rewards, 4)
  adv, keep, metrics = grpo_process_rewards(rewards, 4, correct=correct, filter='negative_only')
  np.testing.assert_allclose(adv, full)  # not re-normalised over the kept samples
  np.testing.assert_allclose(keep, [0.0, 1.0, 1.0, 1.0])
  np.testing.assert_allclose(sample_filter(correct, 'positive_only'), [1.0, 0.0, 0.0, 0.0])
  assert float(metrics['kept_fraction']) == 0.75 and float(metrics['accuracy']) == 0.25
  assert float(metrics['zero_advantage_fraction']) == 0.0
  with pytest.raises(ValueError, match='unknown sample filter'):
    sample_filter(correct, 'best_only')
  with pytest.raises(ValueError, match='needs correct'):
    grpo_process_rewards(rewards, 4, filter='negative_only')
  # With the length reward, an all-correct group is no longer a zero-advantage group.
  lengths = jnp.array([10, 20, 30, 40])
  _, _, metrics = grpo_process_rewards(
    jnp.ones(4), 4, correct=jnp.ones(4, bool), lengths=lengths, length_reward=LengthReward()
  )
  assert float(metrics['zero_advantage_fraction']) == 0.0


def test_inject_offline_samples():
  correct = np.array([0, 0, 0, 0, 1, 0, 1, 1], bool)
  samples = {'tokens': np.arange(16).reshape(8, 2), 'rewards': correct.astype(np.float32)}
  offline = {
    'tokens': np.array([[[100, 101], [102, 103]], [[200, 201], [202, 203]]]),
    'rewards': np.ones((2, 2), np.float32),
  }
  valid = np.array([[True, True], [True, False]])
  merged, new_correct, injected = inject_offline_samples(
    samples, correct, 4, offline, valid, num_replace=1
  )
  # Group 0 (accuracy 0 <= .125): its first wrong rollout becomes the first stored solution.
  np.testing.assert_array_equal(merged['tokens'][0], [100, 101])
  np.testing.assert_array_equal(merged['tokens'][1:], samples['tokens'][1:])  # group 1: acc .75
  np.testing.assert_array_equal(injected, [1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(new_correct, correct | injected)
  assert samples['tokens'][0, 0] == 0  # inputs untouched
  merged, _, injected = inject_offline_samples(samples, correct, 4, offline, valid, num_replace=3)
  np.testing.assert_array_equal(merged['tokens'][:2], [[100, 101], [102, 103]])  # only 2 stored
  assert injected.sum() == 2
  with pytest.raises(ValueError, match='same keys'):
    inject_offline_samples(samples, correct, 4, {'tokens': offline['tokens']}, valid)
  with pytest.raises(ValueError, match='tokens'):
    bad = dict(offline, tokens=offline['tokens'][:, :, :1])
    inject_offline_samples(samples, correct, 4, bad, valid)


# ----------------------------------------------------------------------------- GRPO: loss


def test_grpo_loss_closed_form_and_gradient():
  logps = jnp.array([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
  old = jnp.array([[-1.0, -2.5, -0.1], [-0.2, 0.0, 0.0]])  # rho: [1, e^.5, e^-.4], [1, e^-.3, .]
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  adv = jnp.array([2.0, -1.0])
  loss, metrics = grpo_loss(logps, old, adv, mask, clip_eps=0.2)
  rho = np.exp(np.asarray(logps - old))
  a = np.asarray(adv)[:, None]
  per_token = np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.2))
  m = np.asarray(mask)
  np.testing.assert_allclose(float(loss), (per_token * m).sum() / 5, rtol=1e-6)
  # Gradient: -A rho / T where the unclipped term is active, 0 where the clip is (A>0, rho>1.2).
  active = (-a * rho >= -a * np.clip(rho, 0.8, 1.2)).astype(np.float32)
  expected = -a * rho * active * m / 5
  grad = jax.grad(lambda lp: grpo_loss(lp, old, adv, mask)[0])(logps)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  # Clipped: [0, 1] (A > 0, rho = e^.5 > 1.2) and [1, 1] (A < 0, rho = e^-.3 < .8).
  assert float(metrics['clip_fraction']) == pytest.approx(2 / 5)
  # sequence_mean: mean over sequences of per-sequence token means.
  seq, _ = grpo_loss(logps, old, adv, mask, aggregation='sequence_mean')
  expected_seq = ((per_token * m).sum(1) / m.sum(1)).mean()
  np.testing.assert_allclose(float(seq), expected_seq, rtol=1e-6)


def test_grpo_k3_kl_and_sample_mask():
  logps = jnp.array([[-1.0, -2.0]])
  ref = jnp.array([[-1.5, -1.0]])
  mask = jnp.ones((1, 2))
  adv = jnp.zeros(1)
  loss, metrics = grpo_loss(logps, logps, adv, mask, ref_logps=ref, kl_coef=0.1)
  d = np.array([-0.5, 1.0])
  k3 = np.exp(d) - d - 1
  np.testing.assert_allclose(float(metrics['kl']), k3.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(loss), 0.1 * k3.mean(), rtol=1e-6)
  grad = jax.grad(lambda lp: grpo_loss(lp, lp, adv, mask, ref_logps=ref, kl_coef=0.1)[0])(logps)
  # d k3 / d l = 1 - exp(ref - l); token mean over 2 tokens.
  np.testing.assert_allclose(grad[0], 0.1 * (1 - np.exp(d)) / 2, rtol=1e-5)
  # A dropped sample counts nowhere; no kept token at all gives loss 0.
  logps2 = jnp.array([[-1.0, -2.0], [-3.0, -4.0]])
  old2 = logps2 + 0.1
  adv2 = jnp.array([1.0, 5.0])
  kept, _ = grpo_loss(logps2, old2, adv2, jnp.ones((2, 2)), sample_mask=jnp.array([1.0, 0.0]))
  alone, _ = grpo_loss(logps2[:1], old2[:1], adv2[:1], jnp.ones((1, 2)))
  assert float(kept) == pytest.approx(float(alone))
  empty, _ = grpo_loss(logps2, old2, adv2, jnp.zeros((2, 2)))
  assert float(empty) == 0.0


def test_grpo_bad_input():
  lp = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match='needs ref_logps'):
    grpo_loss(lp, lp, jnp.zeros(2), lp, kl_coef=0.1)
  with pytest.raises(ValueError, match='shape mismatch'):
    grpo_loss(lp, lp[:, :2], jnp.zeros(2), lp)
  with pytest.raises(ValueError, match='advantages shape'):
    grpo_loss(lp, lp, jnp.zeros(3), lp)
  with pytest.raises(ValueError, match='unknown aggregation'):
    grpo_loss(lp, lp, jnp.zeros(2), lp, aggregation='sum')
  with pytest.raises(ValueError, match='clip_eps'):
    grpo_loss(lp, lp, jnp.zeros(2), lp, clip_eps=-0.1)
