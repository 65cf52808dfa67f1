"""kuaijax.routing against a brute-force per-token reference and closed-form losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kuaijax import routing


def reference_top_p(probs: np.ndarray, p: float):
  """Per token: experts in descending order (ties: lower id first), kept while the sum before <= p.

  Returns the full kept list per token and, per token, the smallest distance between p and an
  exclusive prefix sum (where float32 summation order could flip a decision).
  """
  kept, margins = [], []
  for row in np.asarray(probs, np.float64):
    order = np.argsort(-row, kind='stable')
    total, ids, margin = 0.0, [], math.inf
    for j in order:
      margin = min(margin, abs(total - p))
      if total > p:
        break
      ids.append(int(j))
      total += row[j]
    kept.append(ids)
    margins.append(margin)
  return kept, np.array(margins)


def as_lists(weights, ids, num_experts):
  weights, ids = np.asarray(weights), np.asarray(ids)
  out = []
  for w_row, id_row in zip(weights, ids):
    keep = id_row < num_experts
    assert np.all(w_row[~keep] == 0.0), 'dropped slots must carry weight 0'
    assert np.all(keep[: keep.sum()]), 'kept slots come first'
    out.append([int(i) for i in id_row[keep]])
  return out


def random_probs(seed, tokens, num_experts, temperature=1.0):
  logits = np.random.default_rng(seed).normal(size=(tokens, num_experts)) * temperature
  return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


@pytest.mark.parametrize('num_experts', [4, 8, 16, 64])
@pytest.mark.parametrize('p', [0.05, 0.3, 0.4, 0.7, 0.95])
def test_top_p_matches_brute_force(num_experts, p):
  probs = random_probs(num_experts, 400, num_experts, temperature=1.5)
  kept, margins = reference_top_p(probs, p)
  close = margins < 1e-5  # float32 vs float64 summation may legitimately differ there
  assert close.mean() < 0.01
  for k_max in (None, 3):
    weights, ids, truncated = routing.top_p_with_truncation(probs, p=p, k_max=k_max)
    slots = num_experts if k_max is None else k_max
    assert weights.shape == ids.shape == (400, slots)
    assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32
    got = as_lists(weights, ids, num_experts)
    for t in np.flatnonzero(~close):
      assert got[t] == kept[t][:slots], (t, probs[t])
      np.testing.assert_array_equal(np.asarray(weights)[t, : len(got[t])], probs[t, got[t]])
      assert bool(truncated[t]) == (len(kept[t]) > slots)
    if k_max is None:
      assert not np.asarray(truncated).any()


def test_top_p_adversarial_inputs():
  e = 16
  uniform = np.full((1, e), 1 / e, np.float32)
  # p tiny: only the top-1 expert.
  probs = random_probs(0, 64, e)
  w, ids = routing.top_p(probs, p=1e-6)
  np.testing.assert_array_equal(np.asarray(ids)[:, 0], probs.argmax(-1))
  assert np.all(np.asarray(ids)[:, 1:] == e)
  # p = 1: every expert, weights are the probabilities themselves (no renormalisation).
  w, ids = routing.top_p(probs, p=1.0)
  np.testing.assert_array_equal(np.sort(np.asarray(ids), axis=-1), np.tile(np.arange(e), (64, 1)))
  np.testing.assert_allclose(np.asarray(w).sum(-1), probs.sum(-1), rtol=1e-6)
  # Uniform (all ties): exclusive sums j/16 <= 0.4 for j = 0..6 -> 7 experts, lowest ids first.
  w, ids = routing.top_p(uniform, p=0.4)
  assert as_lists(w, ids, e) == [list(range(7))]
  np.testing.assert_array_equal(np.asarray(w)[0, :7], np.full(7, 1 / e, np.float32))
  # A dominant expert (P > p) is kept alone.
  dominant = np.full((1, e), 0.1 / (e - 1), np.float32)
  dominant[0, 5] = 0.9
  assert as_lists(*routing.top_p(dominant, p=0.4), e) == [[5]]
  # Exact equality of the exclusive sum with p keeps the expert (the '<=' of the spec).
  exact = np.array([[0.25, 0.5, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]], np.float32)
  assert as_lists(*routing.top_p(exact, p=0.5), 4) == [[1, 0], [0, 1, 2]]
  # Ties straddling the boundary: lower ids win.
  ties = np.array([[0.1, 0.3, 0.3, 0.3]], np.float32)
  assert as_lists(*routing.top_p(ties, p=0.35), 4) == [[1, 2]]


def test_k_max_truncation_is_counted():
  e = 16
  probs = np.full((3, e), 1 / e, np.float32)  # full Top-P set: 7 experts
  probs[1] = 0.1 / (e - 1)
  probs[1, 2] = 0.9  # 1 expert
  probs[2] = np.array([0.3, 0.3, 0.3] + [0.1 / (e - 3)] * (e - 3), np.float32)  # 2 experts at p=0.4
  w, ids, truncated = routing.top_p_with_truncation(probs, p=0.4, k_max=4)
  np.testing.assert_array_equal(np.asarray(truncated), [True, False, False])
  assert as_lists(w, ids, e) == [[0, 1, 2, 3], [2], [0, 1]]
  # k_max = exactly the set size is not a truncation.
  _, _, truncated = routing.top_p_with_truncation(probs[:1], p=0.4, k_max=7)
  assert not bool(truncated[0])
  stats = routing.routing_stats(ids, e, truncated=np.array([True, False, False]))
  assert float(stats['trunc_rate']) == pytest.approx(1 / 3)


@pytest.mark.parametrize('p, head_suffices', [(0.3, True), (0.9, False)])
def test_uncapped_top_p_over_many_experts_takes_either_path_exactly(p, head_suffices):
  """E=64 uncapped: when every token's top FAST_HEAD experts pass p only they are sorted; else
  the full sort runs. Both give the brute-force selection and the kept-weights gradient."""
  probs = random_probs(7, 200, 64, temperature=3.0)
  head = np.sort(probs, axis=-1)[:, ::-1][:, : routing.FAST_HEAD].sum(-1)
  assert bool(np.all(head > p)) == head_suffices
  kept, margins = reference_top_p(probs, p)
  coeff = jnp.asarray(np.random.default_rng(8).normal(size=(200, 64)), jnp.float32)
  weights, ids = jax.jit(lambda q: routing.top_p(q, p=p))(probs)
  grad = jax.grad(lambda q: jnp.sum(routing.top_p(q, p=p)[0] * coeff))(jnp.asarray(probs))
  got = as_lists(weights, ids, 64)
  expected = np.zeros((200, 64), np.float32)
  for t in range(200):
    if margins[t] > 1e-5:
      assert got[t] == kept[t]
    for s, i in enumerate(got[t]):
      expected[t, i] = coeff[t, s]
  np.testing.assert_array_equal(np.asarray(grad), expected)


def test_gradients_flow_only_through_kept_weights():
  probs = jnp.asarray(random_probs(3, 32, 8))
  coeff = jnp.asarray(np.random.default_rng(1).normal(size=(32, 3)), jnp.float32)
  _, ids = routing.top_p(probs, p=0.5, k_max=3)

  grad = jax.grad(lambda q: jnp.sum(routing.top_p(q, p=0.5, k_max=3)[0] * coeff))(probs)
  expected = np.zeros((32, 8), np.float32)
  for t in range(32):
    for s, i in enumerate(np.asarray(ids)[t]):
      if i < 8:
        expected[t, i] = coeff[t, s]
  np.testing.assert_array_equal(np.asarray(grad), expected)
  # Through softmax logits too: a token whose only kept expert has weight P_top gets dP_top/dz.
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)) * 3, jnp.float32)
  g = jax.grad(lambda z: jnp.sum(routing.top_p(routing.router_probs(z), p=1e-3)[0]))(logits)
  pr = np.asarray(jax.nn.softmax(logits))
  top = pr.argmax(-1)
  onehot = np.eye(6)[top]
  expected = pr[np.arange(4), top][:, None] * (onehot - pr)
  np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-7)


def test_top_k_matches_sort_and_renormalises():
  probs = random_probs(4, 50, 8)
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :2]
  w, ids = routing.top_k(probs, k=2)
  np.testing.assert_array_equal(np.asarray(ids), order)
  np.testing.assert_array_equal(np.asarray(w), np.take_along_axis(probs, order, -1))
  w, _ = routing.top_k(probs, k=2, renormalize=True)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
  grad = jax.grad(lambda q: routing.top_k(q, k=1)[0].sum())(jnp.asarray(probs))
  np.testing.assert_array_equal(np.asarray(grad), np.eye(8)[probs.argmax(-1)])


def test_aux_losses_closed_form():
  # Balanced top-1 assignment: f = Q = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1.
  probs = np.array([[0.75, 0.25], [0.25, 0.75]], np.float32)
  assert float(routing.balance_loss(probs, np.array([[0], [1]]))) == pytest.approx(1.0)
  # Collapsed: f = (1, 0), Q = (0.85, 0.15) -> 2 * 0.85.
  probs = np.array([[0.9, 0.1], [0.8, 0.2]], np.float32)
  assert float(routing.balance_loss(probs, np.array([[0], [0]]))) == pytest.approx(1.7)
  # Variable k with sentinels (id 3): f = (1, 1/2, 0), Q = (0.5, 0.3, 0.2) -> 3 * (0.5 + 0.15).
  probs = np.array([[0.6, 0.3, 0.1], [0.4, 0.3, 0.3]], np.float32)
  ids = np.array([[0, 1], [0, 3]])
  assert float(routing.balance_loss(probs, ids)) == pytest.approx(1.95)
  # Only Q carries gradient: d/dP[t, i] = N * f_i / M.
  g = jax.grad(lambda q: routing.balance_loss(q, ids))(jnp.asarray(probs))
  np.testing.assert_allclose(np.asarray(g), np.tile([1.5, 0.75, 0.0], (2, 1)), rtol=1e-6)
  # Masked-out tokens do not count: token 0 alone -> f = (1, 1, 0), Q = (0.6, 0.3, 0.1).
  assert float(routing.balance_loss(probs, ids, mask=np.array([1, 0]))) == pytest.approx(2.7)

  # Entropy: uniform over 2 of 4 experts -> log 2; one-hot -> 0 (0 log 0 = 0, finite gradient).
  probs = np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], np.float32)
  assert float(routing.router_entropy(probs)) == pytest.approx(math.log(2) / 2)
  g = jax.grad(routing.router_entropy)(jnp.asarray(probs))
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(np.asarray(g)[0, :2], -(np.log(0.5) + 1) / 2, rtol=1e-6)
  assert float(routing.router_entropy(probs, mask=np.array([0, 1]))) == pytest.approx(0.0)

  # z-loss: zero logits -> logsumexp = log E.
  logits = np.zeros((3, 4), np.float32)
  assert float(routing.router_z_loss(logits)) == pytest.approx(math.log(4) ** 2)
  logits[0] = [2.0, 0.0, 0.0, 0.0]
  lse0 = math.log(math.exp(2) + 3)
  assert float(routing.router_z_loss(logits)) == pytest.approx((lse0**2 + 2 * math.log(4) ** 2) / 3)


def test_routing_stats_hand_made():
  ids = np.array([[0, 4, 4], [1, 2, 4], [3, 0, 1], [2, 4, 4]])  # k = 1, 2, 3, 1 over E = 4
  stats = routing.routing_stats(ids, 4)
  assert float(stats['mean_k']) == pytest.approx(7 / 4)
  assert float(stats['max_k']) == 3
  np.testing.assert_allclose(np.asarray(stats['k_hist']), [0, 0.5, 0.25, 0.25])
  np.testing.assert_allclose(np.asarray(stats['expert_load']), [0.5, 0.5, 0.5, 0.25])
  np.testing.assert_array_equal(np.asarray(stats['experts_per_token']), [1, 2, 3, 1])
  assert 'trunc_rate' not in stats
  masked = routing.routing_stats(ids, 4, mask=np.array([1, 1, 0, 1]))
  assert float(masked['mean_k']) == pytest.approx(4 / 3)
  assert float(masked['max_k']) == 2
  np.testing.assert_allclose(np.asarray(masked['expert_load']), [1 / 3, 1 / 3, 2 / 3, 0])
  # Leading batch dims are kept in experts_per_token.
  stats = routing.routing_stats(ids.reshape(2, 2, 3), 4)
  np.testing.assert_array_equal(np.asarray(stats['experts_per_token']), [[1, 2], [3, 1]])


def test_bfloat16_inputs_are_computed_in_float32():
  probs = random_probs(5, 64, 8).astype(jnp.bfloat16)
  w16, ids16 = routing.top_p(probs, p=0.4, k_max=4)
  w32, ids32 = routing.top_p(jnp.asarray(probs, jnp.float32), p=0.4, k_max=4)
  assert w16.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(ids16), np.asarray(ids32))
  np.testing.assert_array_equal(np.asarray(w16), np.asarray(w32))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.bfloat16)
  probs32 = routing.router_probs(logits)
  assert probs32.dtype == jnp.float32
  np.testing.assert_allclose(
    np.asarray(probs32), np.asarray(jax.nn.softmax(logits.astype(jnp.float32))), rtol=1e-6
  )
  for fn in (routing.router_entropy, routing.router_z_loss):
    assert fn(logits).dtype == jnp.float32
  assert routing.top_k(probs, k=2)[0].dtype == jnp.float32


@pytest.mark.parametrize(
  'call, field',
  [
    (lambda q: routing.top_p(q, p=0.0), 'p='),
    (lambda q: routing.top_p(q, p=1.5), 'p='),
    (lambda q: routing.top_p(q, p=True), 'p='),
    (lambda q: routing.top_p(q, p='0.4'), 'p='),
    (lambda q: routing.top_p(q, p=0.4, k_max=0), 'k_max='),
    (lambda q: routing.top_p(q, p=0.4, k_max=9), 'k_max='),
    (lambda q: routing.top_p(q, p=0.4, k_max=2.0), 'k_max='),
    (lambda q: routing.top_k(q, k=0), 'k='),
    (lambda q: routing.top_k(q, k=9), 'k='),
  ],
)
def test_bad_arguments_name_the_field(call, field):
  with pytest.raises(ValueError, match=field):
    call(np.full((2, 8), 1 / 8, np.float32))
