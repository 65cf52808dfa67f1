"""Multi-run statistics against a direct computation."""

import numpy as np
import pytest

from kuaijax.inference.multi_run import multi_run, run_statistics


def test_statistics_against_direct_computation():
  rng = np.random.default_rng(0)
  correct = rng.random((5, 40)) < 0.6
  per_run = [{'accuracy': c.mean(), 'length': float(i)} for i, c in enumerate(correct)]
  out = run_statistics(per_run, correct)
  acc = correct.mean(axis=1)
  assert out['accuracy'] == pytest.approx(acc.mean())
  assert out['accuracy/std'] == pytest.approx(np.sqrt(((acc - acc.mean()) ** 2).sum() / 4))
  assert out['length/max'] == 4.0 and out['length/min'] == 0.0
  uncertain = [0 < correct[:, i].sum() < 5 for i in range(40)]
  assert out['uncertain_fraction'] == pytest.approx(np.mean(uncertain))
  certain = [i for i in range(40) if not uncertain[i]]
  assert out['certain_count'] == len(certain)
  assert out['accuracy_on_certain'] == pytest.approx(np.mean([correct[0, i] for i in certain]))


def test_multi_run_calls_each_seed_and_single_run_has_zero_std():
  seen = []

  def evaluate(seed):
    seen.append(seed)
    return {'accuracy': seed / 10}, np.array([True, seed == 1, False])

  out = multi_run(evaluate, [1, 2])
  assert seen == [1, 2] and out['accuracy'] == pytest.approx(0.15)
  assert out['uncertain_fraction'] == pytest.approx(1 / 3)  # problem 1 solved by one run only
  assert out['accuracy_on_certain'] == pytest.approx(0.5)  # problems 0 (always) and 2 (never)
  assert multi_run(evaluate, [3])['accuracy/std'] == 0.0


def test_bad_input():
  with pytest.raises(ValueError, match='seeds'):
    multi_run(lambda s: ({}, np.zeros(1, bool)), [])
  with pytest.raises(ValueError, match='seeds'):
    multi_run(lambda s: ({}, np.zeros(1, bool)), [1, 1])
  with pytest.raises(ValueError, match=r'\[runs, problems\]'):
    run_statistics([{'a': 1.0}], np.zeros((2, 3), bool))
  with pytest.raises(ValueError, match='same metrics'):
    run_statistics([{'a': 1.0}, {'b': 1.0}], np.zeros((2, 3), bool))
