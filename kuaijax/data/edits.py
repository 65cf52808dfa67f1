"""Token-level Levenshtein alignment with RLMEC's tie-breaking, and the imitation weights it gives.

RLMEC (arXiv 2401.06081; notes in experiments/arith/README.md) weights each token of a rewrite ỹ of a policy sample y by 1.0 if it is
not a match on the alignment path and 0.5 otherwise. For parity with the original code:
- a sentinel is prepended to both token lists; the DP table is the usual edit distance (unit costs);
- each cell picks its move in the order match (only if the tokens are equal), deletion (of a sample
  token), insertion (of a rewrite token), substitution, a later move only if STRICTLY cheaper;
- the backtrace starts at the last cell and stops as soon as either index reaches 0; every visited
  cell whose two tokens differ marks its rewrite token. A deletion therefore marks the preceding kept
  rewrite token, and insertions at the very front are never marked.
E.g. "abcd" -> "acd" gives [1, .5, .5] and "abcd" -> "abc" marks "c".

Speed: pairs are batched (256 per jitted call, on the host CPU whatever the default backend), the
common prefix and suffix of each pair are handled in closed form, the DP of the remaining "core" is
Myers' bit-parallel edit distance (32 rows per machine word) and the backtrace reads the tie-breaking
decisions back from the DP's difference bits, vectorised over the batch in one XLA while loop (see the
comment above `_as_tokens` for why each shortcut is exact; tests/data/edits_test.py checks it against
a plain O(n m) transcription of the original). Its pairs/s on 512-token pairs are timed by
`experiments/bench_edits.py` (`configs/rlmec/bench_edits.py`) through `kuaijax.benchmarking`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  'EditOp',
  'edit_ops',
  'imitation_weights',
  'imitation_weights_batch',
]

# Move codes, in tie-breaking priority order.
_OP_NAMES = ('match', 'delete', 'insert', 'substitute')
_MATCH, _DELETE, _INSERT = 0, 1, 2
_CHUNK = 256  # pairs per jitted call


class EditOp(NamedTuple):
  """One move of the alignment path, in forward order.

  `sample_index` / `rewrite_index` are the 0-based positions of the two tokens of the DP cell the
  move leaves from: match/substitute pair sample_index with rewrite_index; delete removes
  sample_index (rewrite_index is the preceding kept rewrite token, -1 at the front); insert adds
  rewrite_index (sample_index is the preceding sample token, -1 at the front). `marked` says whether
  the move marks its rewrite token (weight 1.0).
  """

  op: str
  sample_index: int
  rewrite_index: int
  marked: bool


def edit_ops(sample_tokens: Sequence[int], rewrite_tokens: Sequence[int]) -> list[EditOp]:
  """The full alignment path (RLMEC tie-breaking) from the start of both lists to their ends.

  Moves the original backtrace never visits (the front of the path once an index reached 0) are the
  DP table's border moves (deletions down the first column, insertions along the first row) and
  are never marked.
  """
  (path,) = _align([sample_tokens], [rewrite_tokens], with_path=True)[1]
  return path


def imitation_weights(sample_tokens: Sequence[int], rewrite_tokens: Sequence[int]) -> np.ndarray:
  """RLMEC imitation weights, float32 [len(rewrite_tokens)]: 1.0 for marked rewrite tokens, else 0.5.

  Pass the token lists exactly as trained on (the original code appends EOS to both). Token ids must
  be integers in [0, 2**31) (ValueError otherwise). Empty rewrite -> empty array; empty sample ->
  all 0.5 (the backtrace stops at once, so an all-insertion path is never marked); identical lists
  -> all 0.5. For many pairs use `imitation_weights_batch` (one call: batched and far faster).
  """
  return _align([sample_tokens], [rewrite_tokens])[0][0]


def imitation_weights_batch(
  sample_tokens: Sequence[Sequence[int]], rewrite_tokens: Sequence[Sequence[int]]
) -> list[np.ndarray]:
  """`imitation_weights` for many pairs at once (the fast path: batched, bucketed by length)."""
  if len(sample_tokens) != len(rewrite_tokens):
    raise ValueError(
      f'imitation_weights_batch: {len(sample_tokens)} samples but {len(rewrite_tokens)} rewrites'
    )
  return _align(sample_tokens, rewrite_tokens)[0]


# ----------------------------------------------------------------------------- implementation
#
# Exactness of the shortcuts (f = the edit-distance table over the sentinel-prefixed lists):
# - Equal tokens always take the match: deletion / insertion cost f[i-1][j] + 1 / f[i][j-1] + 1,
#   never below f[i-1][j-1], and substitution costs f[i-1][j-1] + 1. So a common suffix is walked
#   diagonally without marks, and the backtrace starts after it.
# - With a common prefix of length p, one of pred[:i], fix[:j] is a prefix of the other whenever
#   min(i, j) <= p, so there f[i][j] = |i - j| in closed form: the DP is only needed on the "core"
#   (rows and columns past p, before the suffix), whose border values are exactly those |i - j|, and
#   the backtrace uses the closed form outside it (match if equal, else deletion when i > j,
#   insertion when i < j) and stops on the diagonal inside the prefix (only matches remain).
# - The core DP is Myers' / Hyyro's bit-parallel edit distance (32 rows per uint32 word, with the
#   +1 border carried in at the top of every column for global distance). It yields every vertical
#   and horizontal difference of the table, so the backtrace reads f[i-1][j], f[i][j-1] and
#   f[i-1][j-1] relative to f[i][j] from four bits, which is all the tie-breaking needs.


def _as_tokens(x, what: str) -> np.ndarray:
  a = np.asarray(x)
  if a.size == 0:
    return np.zeros(0, np.int64)
  if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
    raise ValueError(
      f'{what}: expected a 1-D sequence of integer token ids, got {a.dtype} {a.shape}'
    )
  if a.min() < 0 or a.max() >= 2**31:
    raise ValueError(f'{what}: token ids must lie in [0, 2**31), got [{a.min()}, {a.max()}]')
  return a.astype(np.int64)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
  k = min(len(a), len(b))
  diff = np.flatnonzero(a[:k] != b[:k])
  return int(diff[0]) if diff.size else k


def _bucket(x: int, minimum: int) -> int:
  """Next power of two >= max(x, minimum): few distinct shapes, few compilations."""
  return max(minimum, 1 << max(0, int(x) - 1).bit_length())


def _align(samples, rewrites, with_path: bool = False):
  """Weights (and optionally paths) for many pairs; pairs are grouped by core size."""
  preds = [_as_tokens(x, f'sample_tokens[{k}]') for k, x in enumerate(samples)]
  fixes = [_as_tokens(x, f'rewrite_tokens[{k}]') for k, x in enumerate(rewrites)]
  n_pairs = len(preds)
  prefix = np.zeros(n_pairs, np.int64)
  suffix = np.zeros(n_pairs, np.int64)
  for k, (a, b) in enumerate(zip(preds, fixes)):
    prefix[k] = _common_prefix(a, b)
    p = prefix[k]
    suffix[k] = _common_prefix(a[p:][::-1], b[p:][::-1])
  n = np.array([len(a) for a in preds], np.int64)
  m = np.array([len(b) for b in fixes], np.int64)
  core_n, core_m = n - prefix - suffix, m - prefix - suffix
  order = np.lexsort((core_m, core_n))
  weights: list[np.ndarray | None] = [None] * n_pairs
  paths: list[list[EditOp] | None] = [None] * n_pairs
  for start in range(0, n_pairs, _CHUNK):
    idx = order[start : start + _CHUNK]
    bsz = next(size for size in (8, 64, _CHUNK) if size >= len(idx))
    shape = dict(
      N=_bucket(n[idx].max(), 64),
      M=_bucket(m[idx].max(), 64),
      CN=_bucket(core_n[idx].max(), 64),
      CM=_bucket(core_m[idx].max(), 64),
    )
    pred = np.full((bsz, shape['N']), -1, np.int32)
    fix = np.full((bsz, shape['M']), -2, np.int32)
    # Core tokens as per-pair symbol ids: a sample token's rank among the pair's distinct core
    # sample tokens; CN (an all-zero row of the match table) for padding and for rewrite tokens
    # absent from the sample core.
    core_pred = np.full((bsz, shape['CN']), shape['CN'], np.int32)
    core_fix = np.full((bsz, shape['CM']), shape['CN'], np.int32)
    for row, k in enumerate(idx):
      a, b, p = preds[k], fixes[k], prefix[k]
      pred[row, : n[k]] = a
      fix[row, : m[k]] = b
      symbols, core_pred[row, : core_n[k]] = np.unique(a[p : p + core_n[k]], return_inverse=True)
      rewrite_core = b[p : p + core_m[k]]
      pos = np.minimum(np.searchsorted(symbols, rewrite_core), max(len(symbols) - 1, 0))
      found = symbols[pos] == rewrite_core if len(symbols) else np.zeros(len(rewrite_core), bool)
      core_fix[row, : core_m[k]] = np.where(found, pos, shape['CN'])
    lens = functools.partial(_gather_padded, idx=idx, size=bsz)
    with jax.default_device(jax.local_devices(backend='cpu')[0]):
      w, stop, moves = _dp_backtrace(
        pred,
        fix,
        core_pred,
        core_fix,
        lens(n - suffix),
        lens(m - suffix),
        lens(prefix),
        lens(m),
        with_path=with_path,
      )
    w = np.asarray(w)
    for row, k in enumerate(idx):
      weights[k] = w[row, : m[k]].copy()
    if with_path:
      stop, moves = np.asarray(stop), np.asarray(moves)
      for row, k in enumerate(idx):
        paths[k] = _path_ops(
          int(n[k]), int(n[k] - suffix[k]), int(m[k] - suffix[k]), stop[row], moves[row]
        )
  return weights, paths


def _gather_padded(x: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
  out = np.zeros(size, np.int32)
  out[: len(idx)] = x[idx]
  return out


def _path_ops(n, i, j, stop, moves) -> list[EditOp]:
  """Forward-order EditOps of one pair of sample length n, backtrace started at (i, j)."""
  suffix = [EditOp('match', i + k, j + k, False) for k in range(n - i)]
  backward = []
  for code in moves[moves >= 0]:
    op = _OP_NAMES[code]
    backward.append(EditOp(op, i - 1, j - 1, op != 'match'))
    i, j = i - (code != _INSERT), j - (code != _DELETE)
  if (i, j) != tuple(stop):
    raise AssertionError(f'edit path replay ended at {(i, j)}, backtrace at {tuple(stop)}')
  if i == j:  # stopped on the diagonal of the common prefix: only matches remain
    front = [EditOp('match', k, k, False) for k in range(i)]
  elif j == 0:
    front = [EditOp('delete', k, -1, False) for k in range(i)]
  else:
    front = [EditOp('insert', -1, k, False) for k in range(j)]
  return front + backward[::-1] + suffix


def _forward(core_pred, core_fix):
  """Bit-parallel DP over the cores: [CM, 4, W, B] uint32 (Pv, Mv, Ph, Mh of every column).

  `core_pred` [B, CN] / `core_fix` [B, CM] are symbol ids (see `_align`); id CN never matches.
  """
  bsz, cn = core_pred.shape
  words = cn // 32
  ones, one = jnp.uint32(0xFFFFFFFF), jnp.uint32(1)
  # match[b, symbol] = bit mask of the sample rows holding that symbol (distinct bits: add == or).
  rows = jnp.arange(cn)
  match = jnp.zeros((bsz, cn + 1, words), jnp.uint32)
  match = match.at[jnp.arange(bsz)[:, None], core_pred, rows >> 5].add(
    jnp.broadcast_to(one << (rows & 31).astype(jnp.uint32), core_pred.shape)
  )
  match = match.at[:, cn].set(0)
  b = jnp.arange(bsz)

  def column(carry, symbol):
    pv, mv = carry
    eq = match[b, symbol].T
    xv = eq | mv
    # (eq & pv) + pv over `words`-word integers: carry-lookahead ripple across the words.
    a = eq & pv
    s = a + pv
    gen = s < a
    out, carry_in = [s[0]], jnp.zeros_like(gen[0])
    for k in range(1, words):
      carry_in = gen[k - 1] | (carry_in & (s[k - 1] == ones))
      out.append(s[k] + carry_in.astype(jnp.uint32))
    s = jnp.stack(out)
    xh = (s ^ pv) | eq
    ph = mv | ~(xh | pv)
    mh = pv & xh
    up = lambda x: (x << one) | jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1] >> 31])
    ph_s = up(ph).at[0].set(up(ph)[0] | one)  # global distance: the border row grows by 1
    mh_s = up(mh)
    pv_new = mh_s | ~(xv | ph_s)
    mv_new = ph_s & xv
    return (pv_new, mv_new), jnp.stack([pv_new, mv_new, ph, mh])

  init = (jnp.full((words, bsz), ones), jnp.zeros((words, bsz), jnp.uint32))
  return jax.lax.scan(column, init, core_fix.T)[1]


@functools.partial(jax.jit, static_argnames=('with_path',))
def _dp_backtrace(pred, fix, core_pred, core_fix, start_i, start_j, prefix, m, *, with_path):
  """Core DP, then the RLMEC backtrace of every pair at once (a while loop over path steps)."""
  bsz, big_m = fix.shape
  cn, cm = core_pred.shape[1], core_fix.shape[1]
  bits = _forward(core_pred, core_fix)
  b = jnp.arange(bsz)

  def bit(k, col, row):  # difference bit of core cell (row, col + 1), rows 1-based
    r = row - 1
    return ((bits[col, k, r >> 5, b] >> (r & 31).astype(jnp.uint32)) & 1).astype(jnp.int32)

  def active(i, j):
    return (i > 0) & (j > 0) & ~((i == j) & (i <= prefix))

  def step(state):
    i, j, w, moves, t = state
    act = active(i, j)
    ic, jc = jnp.maximum(i, 1), jnp.maximum(j, 1)
    eq = pred[b, ic - 1] == fix[b, jc - 1]
    w = w.at[b, jc - 1].max(jnp.where(act & ~eq, 1.0, 0.0))
    ci, cj = i - prefix, j - prefix
    row, col = jnp.clip(ci, 1, cn), jnp.clip(cj, 1, cm) - 1
    # f of the up, left and diagonal neighbours relative to f[i][j] (= 0).
    up = bit(1, col, row) - bit(0, col, row)
    left = bit(3, col, row) - bit(2, col, row)
    left_col = jnp.maximum(col - 1, 0)
    diag = left - jnp.where(col > 0, bit(0, left_col, row) - bit(1, left_col, row), 1)
    core_delete = (up <= left) & (up <= diag)
    core_insert = ~core_delete & (left <= diag)
    in_core = (ci >= 1) & (cj >= 1)
    delete = jnp.where(in_core, core_delete, i > j)
    insert = jnp.where(in_core, core_insert, i < j)
    code = jnp.where(eq, _MATCH, jnp.where(delete, _DELETE, jnp.where(insert, _INSERT, 3)))
    if with_path:
      moves = moves.at[b, t].set(jnp.where(act, code, -1).astype(jnp.int8))
    i = i - (act & (code != _INSERT))
    j = j - (act & (code != _DELETE))
    return i, j, w, moves, t + 1

  w0 = jnp.where(jnp.arange(big_m)[None] < m[:, None], 0.5, 0.0).astype(jnp.float32)
  moves0 = jnp.full((bsz, pred.shape[1] + big_m if with_path else 1), -1, jnp.int8)
  state = (start_i, start_j, w0, moves0, jnp.int32(0))
  i, j, w, moves, _ = jax.lax.while_loop(lambda s: jnp.any(active(s[0], s[1])), step, state)
  return w, jnp.stack([i, j], axis=1), moves
