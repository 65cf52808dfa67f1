"""RLMEC edit alignment: the spec's worked examples, edge cases, and a plain-DP reference."""

import numpy as np
import pytest

from kuaijax.data.edits import EditOp, edit_ops, imitation_weights, imitation_weights_batch


def _reference(sample, rewrite):
  """Straight O(n m) transcription of the original RLMEC alignment rule (independent of the bit-parallel code).

  Sentinel first; per cell: match if equal, then deletion, insertion, substitution, each only if
  strictly cheaper; backtrace from the last cell while both indices are > 0, marking the rewrite
  token of every visited cell whose tokens differ.
  """
  a, b = [None, *sample], [None, *rewrite]
  inf = float('inf')
  f = [[0] * len(b) for _ in a]
  move = [[(0, 0)] * len(b) for _ in a]
  for j in range(len(b)):
    f[0][j], move[0][j] = j, (0, max(j - 1, 0))
  for i in range(1, len(a)):
    f[i][0], move[i][0] = i, (i - 1, 0)
    for j in range(1, len(b)):
      best, where = inf, None
      if a[i] == b[j]:
        best, where = f[i - 1][j - 1], (i - 1, j - 1)
      for cost, prev in (
        (f[i - 1][j] + 1, (i - 1, j)),
        (f[i][j - 1] + 1, (i, j - 1)),
        (f[i - 1][j - 1] + 1, (i - 1, j - 1)),
      ):
        if cost < best:
          best, where = cost, prev
      f[i][j], move[i][j] = best, where
  weights = [0.5] * len(rewrite)
  i, j = len(sample), len(rewrite)
  while i and j:
    if a[i] != b[j]:
      weights[j - 1] = 1.0
    i, j = move[i][j]
  return np.array(weights, np.float32)


def _ids(text):
  return [ord(c) for c in text]


def test_spec_examples():
  np.testing.assert_array_equal(imitation_weights(_ids('abcd'), _ids('acd')), [1.0, 0.5, 0.5])
  np.testing.assert_array_equal(imitation_weights(_ids('abcd'), _ids('abc')), [0.5, 0.5, 1.0])
  # The deletion of "b" marks the preceding kept rewrite token "a".
  assert edit_ops(_ids('abcd'), _ids('acd')) == [
    EditOp('match', 0, 0, False),
    EditOp('delete', 1, 0, True),
    EditOp('match', 2, 1, False),
    EditOp('match', 3, 2, False),
  ]


def test_edge_cases():
  assert imitation_weights([], []).shape == (0,)
  assert imitation_weights(_ids('abc'), []).shape == (0,)
  np.testing.assert_array_equal(imitation_weights([], _ids('abc')), [0.5, 0.5, 0.5])
  np.testing.assert_array_equal(imitation_weights(_ids('abc'), _ids('abc')), [0.5] * 3)
  # All different, same length: all substitutions, all marked.
  np.testing.assert_array_equal(imitation_weights(_ids('abc'), _ids('xyz')), [1.0] * 3)
  # All different, longer rewrite: insertions then substitutions, all marked.
  np.testing.assert_array_equal(imitation_weights(_ids('ab'), _ids('wxyz')), [1.0] * 4)
  # Insertions at the very front are never marked (the backtrace stops at sample index 0).
  np.testing.assert_array_equal(imitation_weights(_ids('x'), _ids('abx')), [0.5, 0.5, 0.5])
  assert edit_ops(_ids('x'), _ids('abx')) == [
    EditOp('insert', -1, 0, False),
    EditOp('insert', -1, 1, False),
    EditOp('match', 0, 2, False),
  ]
  assert edit_ops(_ids('ab'), []) == [
    EditOp('delete', 0, -1, False),
    EditOp('delete', 1, -1, False),
  ]


def _random_pairs(rng, count, max_len):
  pairs = []
  for _ in range(count):
    n, m = rng.integers(0, max_len, 2)
    vocab = int(rng.integers(1, 5))  # tiny vocabularies: many ties
    a, b = rng.integers(0, vocab, n), rng.integers(0, vocab, m)
    if rng.random() < 0.5 and min(n, m):  # RLMEC-like: a shared prefix
      p = rng.integers(0, min(n, m))
      b[:p] = a[:p]
    if rng.random() < 0.3 and min(n, m):  # and a shared suffix
      s = rng.integers(1, min(n, m) + 1)
      b[-s:] = a[-s:]
    pairs.append((a, b))
  return pairs


def test_matches_reference_dp():
  rng = np.random.default_rng(0)
  pairs = _random_pairs(rng, 300, 40)
  # A few long ones: several 32-bit words per column (carries across words) and larger buckets.
  pairs += _random_pairs(rng, 12, 200)
  got = imitation_weights_batch([a for a, _ in pairs], [b for _, b in pairs])
  for (a, b), w in zip(pairs, got):
    np.testing.assert_array_equal(w, _reference(a.tolist(), b.tolist()), err_msg=f'{a} -> {b}')
  for a, b in pairs[:25]:
    np.testing.assert_array_equal(imitation_weights(a, b), _reference(a.tolist(), b.tolist()))


def test_edit_ops_replay_and_marks():
  rng = np.random.default_rng(1)
  for a, b in _random_pairs(rng, 25, 30):
    ops = edit_ops(a, b)
    i = j = 0
    marks = np.full(len(b), 0.5, np.float32)
    for op in ops:
      if op.op in ('match', 'substitute'):
        assert (op.sample_index, op.rewrite_index) == (i, j)
        assert (a[i] == b[j]) == (op.op == 'match')
        i, j = i + 1, j + 1
      elif op.op == 'delete':
        assert (op.sample_index, op.rewrite_index) == (i, j - 1)
        i += 1
      else:
        assert (op.op, op.sample_index, op.rewrite_index) == ('insert', i - 1, j)
        j += 1
      if op.marked:
        marks[op.rewrite_index] = 1.0
    assert (i, j) == (len(a), len(b))
    np.testing.assert_array_equal(marks, _reference(a.tolist(), b.tolist()))


def test_bad_input():
  with pytest.raises(ValueError, match='1-D'):
    imitation_weights([[1, 2]], [1])
  with pytest.raises(ValueError, match='integer'):
    imitation_weights([1.5, 2.0], [1])
  with pytest.raises(ValueError, match='token ids must lie'):
    imitation_weights([1], [-3])
  with pytest.raises(ValueError, match='2 samples but 1 rewrites'):
    imitation_weights_batch([[1], [2]], [[1]])
