"""Token-level RL objectives: RLMEC and GRPO (with the "Dissecting Long Reasoning Models" variants).

Pure functions over per-token arrays [B, T] (log-probs of the policy being trained, of the sampling
policy and of a reference; rewards; masks), each loss returning `(loss, metrics)` with scalar
metrics. The group-level GRPO pieces (advantages, filtering, length reward, zero-advantage fraction)
are jnp functions over per-sample arrays [N] laid out group after group (samples of prompt i are
rows i*G .. i*G+G-1, the layout of `kuaijax.sampling.generate`); offline-sample injection works on
host numpy batches before scoring.

Method notes (formulas, hyper-parameters, the original code's quirks): experiments/arith/README.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kuaijax.losses.preference import check_same_shape

__all__ = [
  'ADVANTAGE_SCALES',
  'GRPO_LOSS_TYPES',
  'GRPOLossType',
  'SAMPLE_FILTERS',
  'LengthReward',
  'grpo_advantages',
  'grpo_loss',
  'grpo_process_rewards',
  'inject_offline_samples',
  'relative_length_reward',
  'resolve_advantage_scale',
  'rlmec_loss',
  'rlmec_token_rewards',
  'sample_filter',
  'zero_advantage_fraction',
]


# ----------------------------------------------------------------------------- RLMEC


def rlmec_token_rewards(keep_probs: jax.Array, correct: jax.Array, mask: jax.Array) -> jax.Array:
  """RLMEC token rewards from the GRM's keep-probabilities p_t [B, T] (spec step 5).

  Wrong samples (`correct[b]` False): r_t = clip(p_t - 0.5, -0.1, 0); correct samples:
  r_t = clip(p_t - 0.5, 0, 0.5); 0 off the mask. Returns float32 [B, T].
  """
  check_same_shape(('keep_probs', keep_probs), ('mask', mask))
  if jnp.shape(correct) != jnp.shape(keep_probs)[:1]:
    raise ValueError(
      f'rlmec_token_rewards: correct shape {jnp.shape(correct)} != [{jnp.shape(keep_probs)[0]}]'
    )
  d = jnp.asarray(keep_probs, jnp.float32) - 0.5
  ok = jnp.asarray(correct).astype(bool)[:, None]
  r = jnp.where(ok, jnp.clip(d, 0.0, 0.5), jnp.clip(d, -0.1, 0.0))
  return jnp.where(jnp.asarray(mask).astype(bool), r, 0.0)


def rlmec_loss(
  logps: jax.Array,
  old_logps: jax.Array,
  rewards: jax.Array,
  mask: jax.Array,
  imitation_logps: jax.Array | None,
  imitation_weights: jax.Array | None,
  imitation_mask: jax.Array | None,
  *,
  eps: float = 0.3,
  lam: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """RLMEC objective L = L_RL + lam * L_IR (arXiv 2401.06081).

  RL term over the policy samples y ([B, T] arrays): rho_t = exp(l_t - l_old_t) (no gradient),
  w_t = stopgrad(min(rho_t r_t, clip(rho_t, 1-eps, 1+eps) r_t)), and
      L_RL = -sum_{b,t} m_t w_t l_t / N_r,   N_r = #{masked tokens with r_t != 0} over the batch,
  so dL_RL/dl_t = -w_t / N_r. Not PPO-clip: the detached weight multiplies the log-prob.
  Imitation term over the rewrites ỹ ([B', T'] arrays, B' and T' free): with CE_t = -imitation_logps,
      L_IR = sum v_t CE_t / N_v,   N_v = #{masked rewrite tokens with v_t != 0}.

  N_r = 0 (no token carries a reward) gives L_RL = 0 and N_v = 0 gives L_IR = 0: the loss stays
  finite (the original code returned NaN). The three imitation arrays may all be None (no imitation
  term). Masked positions never contribute, whatever they hold. eps must lie in [0, 1) and lam be
  >= 0; shape mismatches inside each group of arrays raise ValueError.

  Metrics: `rl_loss`, `imitation_loss`, `n_r`, `n_v`, `ratio_mean` (mean rho over reward tokens),
  `clip_fraction` (reward tokens whose weight is clipped), `reward_mean` (mean r over reward tokens),
  `weight_mean`.
  """
  if not 0.0 <= eps < 1.0:
    raise ValueError(f'rlmec_loss: eps must lie in [0, 1), got {eps}')
  if not lam >= 0.0:
    raise ValueError(f'rlmec_loss: lam must be >= 0, got {lam}')
  check_same_shape(('logps', logps), ('old_logps', old_logps), ('rewards', rewards), ('mask', mask))
  imitation = (imitation_logps, imitation_weights, imitation_mask)
  if any(x is None for x in imitation) and not all(x is None for x in imitation):
    raise ValueError(
      'rlmec_loss: imitation_logps, imitation_weights and imitation_mask must be all given or all None'
    )

  m = jnp.asarray(mask).astype(bool)
  lp = jnp.where(m, jnp.asarray(logps, jnp.float32), 0.0)
  r = jnp.where(m, jnp.asarray(rewards, jnp.float32), 0.0)
  old = jnp.where(m, jnp.asarray(old_logps, jnp.float32), 0.0)
  rho = jnp.exp(jax.lax.stop_gradient(lp) - old)
  clipped = jnp.clip(rho, 1.0 - eps, 1.0 + eps)
  w = jax.lax.stop_gradient(jnp.minimum(rho * r, clipped * r))
  active = m & (r != 0)
  n_r = active.sum().astype(jnp.float32)
  rl_loss = -(w * lp).sum() / jnp.maximum(n_r, 1.0)

  metrics = {
    'rl_loss': rl_loss,
    'n_r': n_r,
    'ratio_mean': _masked_mean(rho, active),
    'clip_fraction': _masked_mean((rho * r != w).astype(jnp.float32), active),
    'reward_mean': _masked_mean(r, active),
    'weight_mean': _masked_mean(w, active),
  }
  if imitation_logps is None:
    imitation_loss, n_v = jnp.float32(0.0), jnp.float32(0.0)
  else:
    check_same_shape(
      ('imitation_logps', imitation_logps),
      ('imitation_weights', imitation_weights),
      ('imitation_mask', imitation_mask),
    )
    im = jnp.asarray(imitation_mask).astype(bool)
    v = jnp.where(im, jnp.asarray(imitation_weights, jnp.float32), 0.0)
    ce = jnp.where(im, -jnp.asarray(imitation_logps, jnp.float32), 0.0)
    n_v = (im & (v != 0)).sum().astype(jnp.float32)
    imitation_loss = (v * ce).sum() / jnp.maximum(n_v, 1.0)
  metrics['imitation_loss'] = imitation_loss
  metrics['n_v'] = n_v
  return rl_loss + lam * imitation_loss, metrics


# ----------------------------------------------------------------------------- GRPO: groups


def _grouped(x: jax.Array, group_size: int, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim != 1:
    raise ValueError(f'{name} must be a per-sample vector [N], got shape {x.shape}')
  if group_size < 1 or x.shape[0] % group_size:
    raise ValueError(
      f'{name} has {x.shape[0]} samples, not a positive multiple of group_size={group_size}'
    )
  return x.reshape(-1, group_size)


ADVANTAGE_SCALES = ('group', 'batch', 'none')


def _centred(values: jax.Array, weights: jax.Array) -> jax.Array:
  """values [G, K] minus each row's value at its first weighted position (0 where weight is 0).

  Centring on one of the row's own values before any mean makes an all-equal row exactly 0, so its
  advantages are exactly 0 whatever the rounding of the mean (float32 means of 1.2s are not 1.2).
  """
  first = jnp.argmax(weights > 0, axis=1)
  ref = jnp.take_along_axis(values, first[:, None], axis=1)
  return jnp.where(weights > 0, values - ref, 0.0)


def _normalised(
  values: jax.Array, weights: jax.Array, scale: str, eps: float, name: str
) -> jax.Array:
  """(v - mean_row v) / (std + eps) over the weighted entries of each row [G, K] (0 elsewhere).

  std is the unbiased one over the row ('group'), over all weighted entries of the batch ('batch'),
  or none at all ('none': centring only). A row with fewer than 2 weighted entries has std 0.
  """
  if scale not in ADVANTAGE_SCALES:
    raise ValueError(f'{name}: unknown advantage scale {scale!r}; known: {ADVANTAGE_SCALES}')
  w = (weights > 0).astype(jnp.float32)
  c = _centred(values.astype(jnp.float32), w)
  n = w.sum(axis=1, keepdims=True)
  dev = (c - (c * w).sum(axis=1, keepdims=True) / jnp.maximum(n, 1.0)) * w
  if scale == 'none':
    return dev
  if scale == 'group':
    var = jnp.square(dev).sum(axis=1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
  else:  # batch: spread of all weighted values around the batch mean (centred for exactness)
    cb = _centred(values.reshape(1, -1).astype(jnp.float32), w.reshape(1, -1))
    nb = w.sum()
    devb = (cb - (cb * w.reshape(1, -1)).sum() / jnp.maximum(nb, 1.0)) * w.reshape(1, -1)
    var = jnp.square(devb).sum() / jnp.maximum(nb - 1.0, 1.0)
  return dev / (jnp.sqrt(var) + eps)


def grpo_advantages(
  rewards: jax.Array,
  group_size: int,
  *,
  mask: jax.Array | None = None,
  scale: str = 'group',
  eps: float = 1e-6,
) -> jax.Array:
  """Group-relative advantages A = (r - mean_g r) / (std + eps), float32 of the shape of `rewards`.

  `rewards` is [N] (one reward per sample) or [N, T] (per-token rewards, e.g. RLMEC's; then `mask`
  [N, T] says which tokens carry one). Groups are `group_size` consecutive samples; with token rewards
  the group statistics run over all masked tokens of the group's samples (a GRPO-style group baseline
  for token rewards) and unmasked tokens get 0. `scale`: 'group' (unbiased std of the group, the
  default; needs group_size >= 2), 'batch' (unbiased std of all rewards of the batch, as Dr./Lite
  GRPO analyses suggest) or 'none' (mean-centring only, Dr. GRPO). A group whose rewards are all
  equal gets advantages exactly 0, for any reward value (see `_centred`).
  """
  rewards = jnp.asarray(rewards)
  if scale == 'group' and group_size < 2:
    raise ValueError(f'grpo_advantages: group_size must be >= 2 (unbiased std), got {group_size}')
  if rewards.ndim == 1:
    if mask is not None:
      raise ValueError('grpo_advantages: mask is only for per-token rewards [N, T]')
    g = _grouped(rewards, group_size, 'rewards')
    return _normalised(g, jnp.ones_like(g), scale, eps, 'grpo_advantages').reshape(-1)
  if rewards.ndim != 2 or mask is None:
    raise ValueError(
      f'grpo_advantages: rewards must be [N] or [N, T] with a mask [N, T], got {rewards.shape}'
    )
  check_same_shape(('rewards', rewards), ('mask', mask))
  n, t = rewards.shape
  _grouped(rewards[:, 0], group_size, 'rewards')  # validates N against group_size
  g = rewards.reshape(n // group_size, group_size * t)
  w = jnp.asarray(mask).astype(jnp.float32).reshape(g.shape)
  return _normalised(g, w, scale, eps, 'grpo_advantages').reshape(n, t)


def zero_advantage_fraction(
  rewards: jax.Array, group_size: int, mask: jax.Array | None = None
) -> jax.Array:
  """Fraction of groups whose (masked) rewards are all equal (all right / all wrong): no gradient."""
  rewards = jnp.asarray(rewards)
  if rewards.ndim == 1:
    g = _grouped(rewards, group_size, 'rewards')
    w = jnp.ones(g.shape, bool)
  else:
    _grouped(rewards[:, 0], group_size, 'rewards')
    g = rewards.reshape(rewards.shape[0] // group_size, -1)
    w = jnp.asarray(mask).astype(bool).reshape(g.shape)
  hi = jnp.where(w, g, -jnp.inf).max(axis=1)
  lo = jnp.where(w, g, jnp.inf).min(axis=1)
  return ((hi == lo) | ~w.any(axis=1)).astype(jnp.float32).mean()


@dataclasses.dataclass(frozen=True)
class LengthReward:
  """The relative length reward of arXiv 2506.04913 (the paper's defaults)."""

  tau: float = 0.5  # groups with accuracy >= tau get it
  l_base: float = 1000.0  # length scale, tokens
  low: float = -0.5
  high: float = 0.5

  def __post_init__(self):
    if not self.l_base > 0:
      raise ValueError(f'LengthReward.l_base must be > 0, got {self.l_base}')
    if not self.low <= self.high:
      raise ValueError(f'LengthReward: low {self.low} > high {self.high}')


def relative_length_reward(
  rewards: jax.Array,
  correct: jax.Array,
  lengths: jax.Array,
  group_size: int,
  config: LengthReward = LengthReward(),
) -> jax.Array:
  """Rewards plus the relative length bonus, to apply before group normalisation.

  For each correct sample of a group whose accuracy is >= tau, add
  clip((mean length of the group's correct samples - len_i) / l_base, low, high); other samples are
  unchanged. Returns float32 [N].
  """
  r = _grouped(rewards, group_size, 'rewards').astype(jnp.float32)
  c = _grouped(correct, group_size, 'correct').astype(bool)
  n = _grouped(lengths, group_size, 'lengths').astype(jnp.float32)
  n_correct = c.sum(axis=1, keepdims=True)
  mean_len = jnp.where(c, n, 0.0).sum(axis=1, keepdims=True) / jnp.maximum(n_correct, 1)
  eligible = c & (n_correct / group_size >= config.tau)
  bonus = jnp.clip((mean_len - n) / config.l_base, config.low, config.high)
  return (r + jnp.where(eligible, bonus, 0.0)).reshape(-1)


# Which samples stay in the batch after advantages were computed on the full group.
SAMPLE_FILTERS: dict[str, Callable[[jax.Array], jax.Array]] = {
  'all': lambda correct: jnp.ones(correct.shape, bool),
  'negative_only': lambda correct: ~correct,
  'positive_only': lambda correct: correct,
}


def sample_filter(correct: jax.Array, mode: str) -> jax.Array:
  """Float32 [N] sample mask: 'all', 'negative_only' (drop correct) or 'positive_only' (drop wrong)."""
  if mode not in SAMPLE_FILTERS:
    raise ValueError(f'unknown sample filter {mode!r}; known: {tuple(SAMPLE_FILTERS)}')
  return SAMPLE_FILTERS[mode](jnp.asarray(correct).astype(bool)).astype(jnp.float32)


def grpo_process_rewards(
  rewards: jax.Array,
  group_size: int,
  *,
  mask: jax.Array | None = None,
  correct: jax.Array | None = None,
  lengths: jax.Array | None = None,
  length_reward: LengthReward | None = None,
  filter: str = 'all',
  scale: str = 'group',
  eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Rewards [N] or per-token rewards [N, T] (with `mask`) -> (advantages, sample_mask [N], metrics).

  Order: optional relative length reward (needs `correct` and `lengths`; with token rewards the
  bonus is added at each sample's last masked token, as a terminal reward), then group-relative
  advantages over the FULL group (`grpo_advantages` with `scale`), then the sample filter (needs
  `correct` unless 'all'); filtered samples keep their advantage but get sample_mask 0, so they drop
  out of `grpo_loss` entirely (numerator and token count). Offline injection
  (`inject_offline_samples`) happens before, on the host batch. Metrics: `zero_advantage_fraction`
  (groups with all-equal final rewards), `reward_mean`, `advantage_abs_mean` (over kept samples /
  their masked tokens), `kept_fraction`, and `accuracy` when `correct` is given.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if length_reward is not None:
    if correct is None or lengths is None:
      raise ValueError('grpo_process_rewards: length_reward needs correct and lengths')
    if rewards.ndim == 1:
      rewards = relative_length_reward(rewards, correct, lengths, group_size, length_reward)
    else:
      zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
      bonus = relative_length_reward(zeros, correct, lengths, group_size, length_reward)
      m = jnp.asarray(mask).astype(bool)
      last = m.shape[1] - 1 - jnp.argmax(m[:, ::-1], axis=1)
      at_last = jax.nn.one_hot(last, m.shape[1], dtype=bool) & m
      rewards = rewards + jnp.where(at_last, bonus[:, None], 0.0)
  if filter != 'all' and correct is None:
    raise ValueError(f'grpo_process_rewards: filter {filter!r} needs correct')
  advantages = grpo_advantages(rewards, group_size, mask=mask, scale=scale, eps=eps)
  n = rewards.shape[0]
  keep = sample_filter(correct if correct is not None else jnp.zeros((n,), bool), filter)
  if rewards.ndim == 1:
    tokens, kept_tokens = jnp.ones_like(rewards), keep
  else:
    tokens = jnp.asarray(mask, jnp.float32)
    kept_tokens = tokens * keep[:, None]
  metrics = {
    'zero_advantage_fraction': zero_advantage_fraction(rewards, group_size, mask),
    'reward_mean': _masked_mean(rewards, tokens),
    'advantage_abs_mean': _masked_mean(jnp.abs(advantages), kept_tokens),
    'kept_fraction': keep.mean(),
  }
  if correct is not None:
    metrics['accuracy'] = jnp.asarray(correct).astype(jnp.float32).mean()
  return advantages, keep, metrics


def inject_offline_samples(
  samples: Mapping[str, np.ndarray],
  correct: np.ndarray,
  group_size: int,
  offline: Mapping[str, np.ndarray],
  offline_valid: np.ndarray,
  *,
  max_accuracy: float = 0.125,
  num_replace: int = 1,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Replace wrong rollouts of hard groups by stored correct solutions, before rewards/advantages.

  Host-side (numpy), on a freshly sampled batch. In every group whose accuracy is <= max_accuracy,
  the first min(num_replace, #wrong, #valid stored) wrong rollouts are overwritten, in order, by the
  group's valid stored solutions.

  Args:
    samples: per-sample arrays [N, ...] (e.g. tokens, mask, lengths, rewards), N = groups * G.
    correct: [N] bool.
    group_size: G.
    offline: the same keys as `samples`, arrays [num_groups, K, ...] with the trailing shapes of
      `samples` (K stored solutions per prompt; pad them to the rollout length).
    offline_valid: [num_groups, K] bool, which stored solutions exist.
    max_accuracy: groups with accuracy <= this get injections (0.125 = 1 of 8).
    num_replace: most rollouts replaced per group.

  Returns:
    `(merged, correct, injected)`: new arrays (inputs untouched), the updated correctness (injected
    samples are correct) and the [N] bool mask of injected rows. Injected rows were not sampled from
    the policy: re-score them (old / reference log-probs) before the update.
  """
  correct = np.asarray(correct, bool)
  n = correct.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f'correct has {n} samples, not a positive multiple of group_size={group_size}')
  groups = n // group_size
  offline_valid = np.asarray(offline_valid, bool)
  if offline_valid.ndim != 2 or offline_valid.shape[0] != groups:
    raise ValueError(f'offline_valid must be [{groups}, K], got {offline_valid.shape}')
  if set(samples) != set(offline):
    raise ValueError(
      f'samples and offline must have the same keys: {sorted(samples)} vs {sorted(offline)}'
    )
  if num_replace < 0:
    raise ValueError(f'num_replace must be >= 0, got {num_replace}')
  for key in samples:
    s, o = np.shape(samples[key]), np.shape(offline[key])
    if s[:1] != (n,) or o[:2] != offline_valid.shape or s[1:] != o[2:]:
      raise ValueError(
        f'{key}: samples shape {s} / offline shape {o} do not fit N={n}, '
        f'offline_valid {offline_valid.shape}'
      )

  merged = {k: np.array(v, copy=True) for k, v in samples.items()}
  new_correct = correct.copy()
  injected = np.zeros(n, bool)
  for g in range(groups):
    rows = np.arange(g * group_size, (g + 1) * group_size)
    if correct[rows].mean() > max_accuracy:
      continue
    wrong = rows[~correct[rows]]
    stored = np.flatnonzero(offline_valid[g])
    k = min(num_replace, len(wrong), len(stored))
    for row, slot in zip(wrong[:k], stored[:k]):
      for key in merged:
        merged[key][row] = offline[key][g, slot]
      new_correct[row] = True
      injected[row] = True
  return merged, new_correct, injected


# ----------------------------------------------------------------------------- GRPO: loss


def _sequence_then_batch_mean(per_token, m, keep, max_length):
  """grpo: each kept non-empty sequence's token mean, then the mean over those sequences."""
  del max_length
  per_seq = (per_token * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)
  k = keep * (m.sum(-1) > 0)
  return (per_seq * k).sum() / jnp.maximum(k.sum(), 1.0)


def _token_mean(per_token, m, keep, max_length):
  """bnpo / dapo / cispo: sum over all kept tokens of the batch / their number."""
  del max_length
  w = m * keep[:, None]
  return (per_token * w).sum() / jnp.maximum(w.sum(), 1.0)


def _constant_length_sum(per_token, m, keep, max_length):
  """dr_grpo: sum over kept tokens / (kept sequences x max_length): no length normalisation."""
  w = m * keep[:, None]
  return (per_token * w).sum() / (jnp.maximum(keep.sum(), 1.0) * max_length)


@dataclasses.dataclass(frozen=True)
class GRPOLossType:
  """One member of the GRPO loss family (chosen by name through `GRPO_LOSS_TYPES`).

  aggregate: (per-token loss, mask, kept samples, max_length) -> scalar.
  objective: 'ppo_clip' (min of the clipped and unclipped surrogate) or 'cispo' (REINFORCE with a
    detached, clipped importance weight).
  clip_eps_high: the default upper clip epsilon (None: the same as clip_eps).
  advantage_scale: the advantage scaling the method recommends (`grpo_advantages(scale=...)`).
  """

  aggregate: Callable
  objective: str = 'ppo_clip'
  clip_eps_high: float | None = None
  advantage_scale: str = 'group'


GRPO_LOSS_TYPES: dict[str, GRPOLossType] = {
  'grpo': GRPOLossType(_sequence_then_batch_mean),  # DeepSeekMath
  'bnpo': GRPOLossType(_token_mean),  # token mean over the batch
  'dr_grpo': GRPOLossType(_constant_length_sum, advantage_scale='none'),  # Dr. GRPO
  'dapo': GRPOLossType(_token_mean, clip_eps_high=0.28),  # token-level loss + clip-higher
  'cispo': GRPOLossType(_token_mean, objective='cispo', clip_eps_high=4.0),  # MiniMax-M1
}


def resolve_advantage_scale(scale: str, loss_type: str) -> str:
  """'auto' -> the loss type's recommended scaling; any other name is checked and returned."""
  if loss_type not in GRPO_LOSS_TYPES:
    raise ValueError(f'unknown GRPO loss type {loss_type!r}; known: {tuple(GRPO_LOSS_TYPES)}')
  if scale == 'auto':
    return GRPO_LOSS_TYPES[loss_type].advantage_scale
  if scale not in ADVANTAGE_SCALES:
    raise ValueError(f'unknown advantage scale {scale!r}; known: {("auto", *ADVANTAGE_SCALES)}')
  return scale


def grpo_loss(
  logps: jax.Array,
  old_logps: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  loss_type: str = 'grpo',
  ref_logps: jax.Array | None = None,
  kl_coef: float = 0.0,
  clip_eps: float = 0.2,
  clip_eps_high: float | None = None,
  max_length: int | None = None,
  sample_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO family of policy losses, with an optional low-variance (k3) KL to a reference.

  Per token, rho = exp(l - l_old), A the advantage (per sample [B] or per token [B, T]):
    ppo_clip (grpo, bnpo, dr_grpo, dapo), gradient through rho:
      loss_t = max(-A rho, -A clip(rho, 1 - clip_eps, 1 + clip_eps_high))
    cispo, gradient through l only (REINFORCE with a clipped importance-sampling weight):
      loss_t = -sg(min(rho, 1 + clip_eps_high)) A l          (no lower clip, as in MiniMax-M1)
  plus kl_coef * k3_t, k3_t = exp(l_ref - l) - (l_ref - l) - 1. Aggregation over the completion
  mask m and the kept samples (`sample_mask`):
    grpo    (1/|S|) sum_{b in S} (1/|m_b|) sum_t loss_bt      S: kept, non-empty sequences
    bnpo    sum_{b,t} loss_bt / #kept tokens                 (the batch's token mean)
    dapo    as bnpo (token-level over the whole group batch), clip_eps_high 0.28 by default
    dr_grpo sum_{b,t} loss_bt / (#kept sequences * max_length), max_length defaults to T;
            pair it with advantages scaled by 'none' (`resolve_advantage_scale('auto', 'dr_grpo')`)
    cispo   as bnpo, clip_eps_high 4.0 by default (weights capped at 5)
  The KL term uses the same aggregation. clip_eps_high=None takes the loss type's default.

  A batch without any kept token gives loss 0. Metrics: `policy_loss`, `kl`, `clip_fraction_low`
  (kept tokens with A < 0 and rho < 1 - clip_eps, whose gradient the clip stops; always 0 for cispo),
  `clip_fraction_high` (A > 0 and rho > 1 + clip_eps_high; for cispo every rho above the cap),
  `clip_fraction` (their sum), `ratio_mean`, `advantage_mean`, `advantage_abs_mean`, `tokens`.
  """
  if loss_type not in GRPO_LOSS_TYPES:
    raise ValueError(f'grpo_loss: unknown loss type {loss_type!r}; known: {tuple(GRPO_LOSS_TYPES)}')
  spec = GRPO_LOSS_TYPES[loss_type]
  if clip_eps_high is None:
    clip_eps_high = clip_eps if spec.clip_eps_high is None else spec.clip_eps_high
  if not (clip_eps >= 0 and clip_eps_high >= 0):
    raise ValueError(
      f'grpo_loss: clip_eps / clip_eps_high must be >= 0, got {clip_eps}, {clip_eps_high}'
    )
  if not kl_coef >= 0:
    raise ValueError(f'grpo_loss: kl_coef must be >= 0, got {kl_coef}')
  if kl_coef > 0 and ref_logps is None:
    raise ValueError('grpo_loss: kl_coef > 0 needs ref_logps')
  named = [('logps', logps), ('old_logps', old_logps), ('mask', mask)]
  if ref_logps is not None:
    named.append(('ref_logps', ref_logps))
  check_same_shape(*named)
  batch = jnp.shape(logps)[:1]
  if jnp.shape(advantages) not in (batch, jnp.shape(logps)):
    raise ValueError(
      f'grpo_loss: advantages shape {jnp.shape(advantages)} is neither {batch} nor {jnp.shape(logps)}'
    )
  if sample_mask is not None and jnp.shape(sample_mask) != batch:
    raise ValueError(f'grpo_loss: sample_mask shape {jnp.shape(sample_mask)} != {batch}')
  max_length = jnp.shape(logps)[1] if max_length is None else max_length
  if not max_length >= 1:
    raise ValueError(f'grpo_loss: max_length must be >= 1, got {max_length}')

  m = jnp.asarray(mask).astype(bool)
  mf = m.astype(jnp.float32)
  keep = (
    jnp.ones(batch, jnp.float32) if sample_mask is None else jnp.asarray(sample_mask, jnp.float32)
  )
  a = jnp.asarray(advantages, jnp.float32)
  a = jnp.broadcast_to(a[:, None] if a.ndim == 1 else a, m.shape)
  lp = jnp.where(m, jnp.asarray(logps, jnp.float32), 0.0)
  old = jnp.where(m, jnp.asarray(old_logps, jnp.float32), 0.0)
  rho = jnp.exp(lp - old)
  high = 1.0 + clip_eps_high
  if spec.objective == 'cispo':
    weight = jax.lax.stop_gradient(jnp.minimum(rho, high))
    per_token = -weight * a * lp
    clipped_low = jnp.zeros(m.shape, bool)
    clipped_high = jax.lax.stop_gradient(rho) > high
  else:
    per_token = jnp.maximum(-a * rho, -a * jnp.clip(rho, 1.0 - clip_eps, high))
    clipped_low = (a < 0) & (rho < 1.0 - clip_eps)
    clipped_high = (a > 0) & (rho > high)
  policy_loss = spec.aggregate(per_token, mf, keep, max_length)
  if ref_logps is not None:
    d = jnp.where(m, jnp.asarray(ref_logps, jnp.float32), 0.0) - lp
    kl = spec.aggregate(jnp.exp(d) - d - 1.0, mf, keep, max_length)
  else:
    kl = jnp.float32(0.0)
  loss = policy_loss + kl_coef * kl if kl_coef > 0 else policy_loss
  tok = mf * keep[:, None]
  low_frac = _masked_mean(clipped_low.astype(jnp.float32), tok)
  high_frac = _masked_mean(clipped_high.astype(jnp.float32), tok)
  metrics = {
    'policy_loss': policy_loss,
    'kl': kl,
    'clip_fraction_low': low_frac,
    'clip_fraction_high': high_frac,
    'clip_fraction': low_frac + high_frac,
    'ratio_mean': _masked_mean(rho, tok),
    'advantage_mean': _masked_mean(a, tok),
    'advantage_abs_mean': _masked_mean(jnp.abs(a), tok),
    'tokens': tok.sum(),
  }
  return loss, metrics


# ----------------------------------------------------------------------------- helpers


def _masked_mean(x, w):
  w = jnp.asarray(w, jnp.float32)
  return (jnp.where(w > 0, x, 0.0) * w).sum() / jnp.maximum(w.sum(), 1.0)
