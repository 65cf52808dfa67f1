"""LM loss, per-task sums, unigram baseline and the LR schedule against closed forms."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kuaijax.evals.lm_loss import unigram_baseline
from kuaijax.losses.lm import lm_loss, per_task_sums, token_cross_entropy
from kuaijax.train.optim import learning_rate_schedule


def test_lm_loss_closed_form_and_gradient():
  logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0]]])  # p = [1/4, 3/4], [1/2, 1/2]
  targets = jnp.array([[1, 0]])
  mask = jnp.array([[1.0, 1.0]])
  loss, metrics = lm_loss(logits, targets, mask)
  expected = (-math.log(0.75) - math.log(0.5)) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics['tokens']) == 2.0
  grad = jax.grad(lambda x: lm_loss(x, targets, mask)[0])(logits)
  # d CE / d logits = (softmax - onehot) / tokens
  np.testing.assert_allclose(grad[0, 0], [0.25 / 2, (0.75 - 1) / 2], atol=1e-6)
  np.testing.assert_allclose(grad[0, 1], [(0.5 - 1) / 2, 0.5 / 2], atol=1e-6)


def test_masked_tokens_do_not_count_and_empty_mask_is_finite():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  targets = jnp.array([[1, 2, 3], [4, 0, 1]])
  mask = jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
  ce, _ = token_cross_entropy(logits, targets)
  loss, _ = lm_loss(logits, targets, mask)
  assert float(loss) == pytest.approx(float((ce[0, 0] + ce[0, 2]) / 2), rel=1e-6)
  empty, _ = lm_loss(logits, targets, jnp.zeros_like(mask))
  assert float(empty) == 0.0
  z_loss, m = lm_loss(logits, targets, mask, z_loss=1e-2)
  assert float(z_loss) == pytest.approx(float(loss) + 1e-2 * float(m['z_loss']), rel=1e-6)


def test_per_task_sums():
  losses = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  mask = jnp.array([[1.0, 1.0, 0.0, 1.0]])
  tasks = jnp.array([[0, 2, 2, 2]])
  sums, counts = per_task_sums(losses, mask, tasks, 3)
  np.testing.assert_allclose(sums, [1.0, 0.0, 6.0])
  np.testing.assert_allclose(counts, [1.0, 0.0, 2.0])


def test_unigram_baseline_closed_form():
  counts = np.array([5, 1, 1, 0])  # add-one smoothing: [6, 2, 2, 1] / 11
  batch = {
    'targets': np.array([[0, 1, 3]]),
    'loss_mask': np.array([[1.0, 1.0, 0.0]]),
    'task_ids': np.array([[0, 1, 1]]),
  }
  out = unigram_baseline(counts, [batch], ('a', 'b'))
  assert out['loss/a'] == pytest.approx(-math.log(6 / 11))
  assert out['loss/b'] == pytest.approx(-math.log(2 / 11))
  assert out['loss'] == pytest.approx((-math.log(6 / 11) - math.log(2 / 11)) / 2)


def test_warmup_cosine_schedule_values():
  opt = ml_collections.ConfigDict(dict(lr=1.0, min_lr_ratio=0.1, warmup_steps=10))
  schedule = learning_rate_schedule(opt, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # half-way down the cosine
  assert float(schedule(110)) == pytest.approx(0.1, rel=1e-5)
