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


@pytest.mark.parametrize('scale', rl.ADVANTAGE_SCALES)
def test_constant_groups_get_exactly_zero_advantages(scale):
  """Non-dyadic constant groups (1.2 is not a float32 number) and large magnitudes: exactly 0."""
  values = [1.2, 0.3, 0.1, 0.7, 1e6 + 0.3, -123.456]
  rewards = jnp.asarray(np.repeat(values, 8), jnp.float32)
  adv = grpo_advantages(rewards, 8, scale=scale)
  assert np.all(np.asarray(adv) == 0.0), np.abs(np.asarray(adv)).max()
  assert float(zero_advantage_fraction(rewards, 8)) == 1.0
  # The same groups as per-token rewards [N, T] with ragged masks.
  mask = np.ones((48, 3), np.float32)
  mask[::3, 2] = 0
  tok = jnp.asarray(np.repeat(rewards[:, None], 3, axis=1) * mask)
  adv = grpo_advantages(tok, 8, mask=jnp.asarray(mask), scale=scale)
  assert np.all(np.asarray(adv) == 0.0)
  assert float(zero_advantage_fraction(tok, 8, jnp.asarray(mask))) == 1.0


def _np_advantages(rewards, group_size, scale, eps=1e-6):
  g = np.asarray(rewards, np.float64).reshape(-1, group_size)
  dev = g - g.mean(axis=1, keepdims=True)
  if scale == 'none':
    return dev.reshape(-1)
  std = g.std(axis=1, ddof=1, keepdims=True) if scale == 'group' else g.std(ddof=1)
  return (dev / (std + eps)).reshape(-1)


@pytest.mark.parametrize('scale', rl.ADVANTAGE_SCALES)
def test_advantages_match_float64_on_near_constant_and_large_groups(scale):
  rng = np.random.default_rng(0)
  base = np.float32(0.7)
  near = (base + np.float32(1e-7) * rng.integers(0, 3, 8)).astype(np.float32)  # ulps apart
  large = (np.float32(1e6) + rng.integers(0, 4, 8)).astype(np.float32)
  mixed = rng.normal(size=8).astype(np.float32)
  rewards = np.concatenate([near, large, mixed])
  want = _np_advantages(rewards, 8, scale)
  got = np.asarray(grpo_advantages(jnp.asarray(rewards), 8, scale=scale))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_token_reward_advantages_closed_form():
  # Two groups of 2 samples x 3 tokens; stats over each group's masked tokens.
  rewards = np.array([[0.1, 0.0, -0.1], [0.2, 0.3, 9.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
  mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], np.float32)
  got = grpo_advantages(jnp.asarray(rewards), 2, mask=jnp.asarray(mask), scale='group')
  for g in range(2):
    r = rewards[2 * g : 2 * g + 2][mask[2 * g : 2 * g + 2] > 0]
    want = (rewards[2 * g : 2 * g + 2] - r.mean()) / (r.std(ddof=1) + 1e-6)
    want = np.where(mask[2 * g : 2 * g + 2] > 0, want, 0.0)
    np.testing.assert_allclose(got[2 * g : 2 * g + 2], want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='mask'):
    grpo_advantages(jnp.asarray(rewards), 2)
  with pytest.raises(ValueError, match='only for per-token'):
    grpo_advantages(jnp.zeros(4), 2, mask=jnp.ones(4))
  with pytest.raises(ValueError, match='unknown advantage scale'):
    grpo_advantages(jnp.zeros(4), 2, scale='std')


def test_token_rewards_compose_with_length_reward_and_filters():
  rewards = jnp.zeros((4, 3))
  mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], jnp.float32)
  correct = jnp.array([True, True, False, True])
  lengths = jnp.array([3, 2, 1, 3])
  cfg = LengthReward(tau=0.5, l_base=10.0, low=-1.0, high=1.0)
  adv, keep, metrics = grpo_process_rewards(
    rewards,
    2,
    mask=mask,
    correct=correct,
    lengths=lengths,
    length_reward=cfg,
    filter='positive_only',
    scale='none',
  )
  # Group 0 (both correct, mean length 2.5): bonus -0.05 / +0.05 at the last masked token.
  # Its masked token rewards [0, 0, -.05, 0, .05] have mean 0, so the advantages are the rewards.
  np.testing.assert_allclose(adv[0], [0.0, 0.0, -0.05], atol=1e-7)
  np.testing.assert_allclose(adv[1], [0.0, 0.05, 0.0], atol=1e-7)
  # Group 1 (accuracy .5 >= tau; only row 3 correct, its own mean length): no bonus, all zero.
  assert np.all(np.asarray(adv[2:]) == 0.0)
  np.testing.assert_allclose(keep, [1.0, 1.0, 0.0, 1.0])
  assert float(metrics['zero_advantage_fraction']) == 0.5


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


# An independent numpy reference of the GRPO family: per-token terms and aggregations by loops.
LOSS_LOGPS = np.array([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0], [-0.7, -1.1, -0.4]])
# rho: [1, e^.5, e^-.4], [1, e^-.3, .], [e^.8, e^-.6, 1]
LOSS_OLD = np.array([[-1.0, -2.5, -0.1], [-0.2, 0.0, 0.0], [-1.5, -0.5, -0.4]])
LOSS_MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], np.float32)
LOSS_ADV = np.array([2.0, -1.0, 0.5])


def _np_grpo_family(loss_type, adv, keep, eps=0.2, eps_high=None, max_length=3):
  """(loss, d loss / d logps) of one GRPO loss type, computed token by token in float64."""
  eps_high = {'dapo': 0.28, 'cispo': 4.0}.get(loss_type, eps) if eps_high is None else eps_high
  rho = np.exp(LOSS_LOGPS - LOSS_OLD)
  adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, rho.shape)
  loss_t, grad_t = np.zeros_like(rho), np.zeros_like(rho)
  for b, t in np.ndindex(*rho.shape):
    a, r = adv[b, t], rho[b, t]
    if loss_type == 'cispo':  # -sg(min(rho, 1 + eps_high)) A l
      w = min(r, 1 + eps_high)
      loss_t[b, t], grad_t[b, t] = -w * a * LOSS_LOGPS[b, t], -w * a
    else:  # max(-A rho, -A clip(rho)); d/dl of -A rho is -A rho, of the clipped branch 0
      clipped = min(max(r, 1 - eps), 1 + eps_high)
      loss_t[b, t] = max(-a * r, -a * clipped)
      grad_t[b, t] = -a * r if -a * r >= -a * clipped else 0.0
  rows = [b for b in range(3) if keep[b] and LOSS_MASK[b].sum() > 0]
  weight = np.zeros_like(rho)  # d loss / d loss_t
  for b in rows:
    for t in range(3):
      if LOSS_MASK[b, t]:
        if loss_type == 'grpo':
          weight[b, t] = 1 / (len(rows) * LOSS_MASK[b].sum())
        elif loss_type == 'dr_grpo':
          weight[b, t] = 1 / (len(rows) * max_length)
        else:
          weight[b, t] = 1 / sum(LOSS_MASK[c].sum() for c in rows)
  return (loss_t * weight).sum(), grad_t * weight


@pytest.mark.parametrize('loss_type', sorted(rl.GRPO_LOSS_TYPES))
@pytest.mark.parametrize('keep', [(1, 1, 1), (1, 0, 1)])
@pytest.mark.parametrize('per_token_adv', [False, True])
def test_grpo_loss_types_closed_form_and_gradient(loss_type, keep, per_token_adv):
  keep = np.array(keep, np.float32)
  adv = LOSS_ADV
  if per_token_adv:
    adv = LOSS_ADV[:, None] * np.array([1.0, -0.5, 2.0])
  kwargs = dict(loss_type=loss_type, sample_mask=jnp.asarray(keep))
  if loss_type == 'dr_grpo':
    kwargs['max_length'] = 4
  want, want_grad = _np_grpo_family(loss_type, adv, keep, max_length=kwargs.get('max_length', 3))
  args = (jnp.asarray(LOSS_OLD), jnp.asarray(adv), jnp.asarray(LOSS_MASK))
  loss, metrics = grpo_loss(jnp.asarray(LOSS_LOGPS), *args, **kwargs)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  grad = jax.grad(lambda lp: grpo_loss(lp, *args, **kwargs)[0])(jnp.asarray(LOSS_LOGPS))
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  assert float(metrics['policy_loss']) == pytest.approx(float(loss))


def test_grpo_clip_fractions_low_and_high():
  args = (jnp.asarray(LOSS_LOGPS), jnp.asarray(LOSS_OLD), jnp.asarray(LOSS_ADV))
  _, m = grpo_loss(*args, jnp.asarray(LOSS_MASK), loss_type='bnpo', clip_eps=0.2)
  # 8 tokens. high (A > 0, rho > 1.2): [0,1] e^.5 and [2,0] e^.8; low (A < 0, rho < .8): [1,1] e^-.3.
  assert float(m['clip_fraction_high']) == pytest.approx(2 / 8)
  assert float(m['clip_fraction_low']) == pytest.approx(1 / 8)
  assert float(m['clip_fraction']) == pytest.approx(3 / 8)
  # Clip-higher (dapo, 1.28): e^.5 = 1.65 and e^.8 = 2.23 still clip; cispo (cap 5): nothing does.
  _, m = grpo_loss(*args, jnp.asarray(LOSS_MASK), loss_type='dapo')
  assert float(m['clip_fraction_high']) == pytest.approx(2 / 8)
  _, m = grpo_loss(*args, jnp.asarray(LOSS_MASK), loss_type='cispo')
  assert float(m['clip_fraction']) == 0.0
  _, m = grpo_loss(*args, jnp.asarray(LOSS_MASK), loss_type='cispo', clip_eps_high=1.0)
  assert float(m['clip_fraction_high']) == pytest.approx(1 / 8)  # only e^.8 = 2.23 > 2
  assert float(m['advantage_abs_mean']) == pytest.approx((3 * 2 + 2 * 1 + 3 * 0.5) / 8)


def test_grpo_loss_closed_form_and_gradient():
  logps = jnp.array([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
  old = jnp.array([[-1.0, -2.5, -0.1], [-0.2, 0.0, 0.0]])  # rho: [1, e^.5, e^-.4], [1, e^-.3, .]
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  adv = jnp.array([2.0, -1.0])
  loss, metrics = grpo_loss(logps, old, adv, mask, clip_eps=0.2, loss_type='bnpo')
  rho = np.exp(np.asarray(logps - old))
  a = np.asarray(adv)[:, None]
  per_token = np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.2))
  m = np.asarray(mask)
  np.testing.assert_allclose(float(loss), (per_token * m).sum() / 5, rtol=1e-6)
  # Gradient: -A rho / T where the unclipped term is active, 0 where the clip is (A>0, rho>1.2).
  active = (-a * rho >= -a * np.clip(rho, 0.8, 1.2)).astype(np.float32)
  expected = -a * rho * active * m / 5
  grad = jax.grad(lambda lp: grpo_loss(lp, old, adv, mask, loss_type='bnpo')[0])(logps)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
  # Clipped: [0, 1] (A > 0, rho = e^.5 > 1.2) and [1, 1] (A < 0, rho = e^-.3 < .8).
  assert float(metrics['clip_fraction']) == pytest.approx(2 / 5)
  # grpo: mean over sequences of per-sequence token means.
  seq, _ = grpo_loss(logps, old, adv, mask, loss_type='grpo')
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
  for loss_type in rl.GRPO_LOSS_TYPES:
    kw = dict(loss_type=loss_type, max_length=2)
    keep = jnp.array([1.0, 0.0])
    kept, _ = grpo_loss(logps2, old2, adv2, jnp.ones((2, 2)), sample_mask=keep, **kw)
    alone, _ = grpo_loss(logps2[:1], old2[:1], adv2[:1], jnp.ones((1, 2)), **kw)
    assert float(kept) == pytest.approx(float(alone)), loss_type
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
  with pytest.raises(ValueError, match='unknown loss type'):
    grpo_loss(lp, lp, jnp.zeros(2), lp, loss_type='sum')
  with pytest.raises(ValueError, match='max_length'):
    grpo_loss(lp, lp, jnp.zeros(2), lp, loss_type='dr_grpo', max_length=0)
  with pytest.raises(ValueError, match='unknown advantage scale'):
    rl.resolve_advantage_scale('std', 'grpo')
  assert rl.resolve_advantage_scale('auto', 'dr_grpo') == 'none'
  assert rl.resolve_advantage_scale('auto', 'dapo') == 'group'
  assert rl.resolve_advantage_scale('batch', 'dr_grpo') == 'batch'
  with pytest.raises(ValueError, match='clip_eps'):
    grpo_loss(lp, lp, jnp.zeros(2), lp, clip_eps=-0.1)
