"""Many-shot in-context learning by gradient matching: pick k demonstrations whose fine-tuning
gradient matches the whole training set's mean gradient.

The pure core, in three parts:
- Features. `example_gradient_features` gives, per example (a row of token ids and a target-aligned
  loss mask over its answer tokens), the gradient of that example's mean token NLL w.r.t. a chosen
  subset of the parameters (`select`), flattened and reduced by a seeded random (JL) projection.
  Per-example gradients are `jax.vmap(jax.grad(...))` over a batch, one compiled program per batch
  shape; examples stream batch by batch. `example_embeddings` gives the mean final hidden state over
  the masked tokens (the k-means baseline's input).
- The projection (`random_projection`). The [D, p] matrix is never built: each parameter leaf i has
  its own key `fold_in(key(seed), i)` (i = the leaf's index among all the model's parameters, so a
  leaf projects the same way whatever else `select` picks), and its rows are generated chunk by
  chunk (`chunk_rows` rows, key `fold_in(leaf_key, chunk)`) inside a `lax.scan`, so at most
  chunk_rows x p random entries exist at a time. Entries are Rademacher (+-1) or Gaussian, scaled by
  1/sqrt(p), so E|Px|^2 = |x|^2. Given (seed, p, kind, chunk_rows) every batch sees the same matrix.
- Selection. `select_gradient_matching` (greedy forward selection of k distinct rows whose mean
  feature is closest to the target), and the baselines `select_random`, `select_ngram_similarity`
  (BM25 against the test queries) and `select_kmeans` (the example nearest each k-means centroid).

Loss-mask convention (as `sampling.score` and the LM batches): `loss_mask[b, t]` selects the
prediction made at position t, i.e. of `tokens[b, t + 1]`; the last column has no target and is
ignored. Rows are right-padded (padding after the last target cannot affect it: attention is causal).
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax.losses.lm import token_cross_entropy

PROJECTIONS = ('rademacher', 'gaussian')
# Random entries generated at a time per leaf when `chunk_rows` is not given (16M floats = 64 MiB).
_CHUNK_ELEMENTS = 1 << 24

Select = str | Callable[[str], bool] | None


# ---------------------------------------------------------------------------------------------
# Parameter selection


def _path_name(path) -> str:
  return '/'.join(str(p) for p in path)


def _param_filter(select: Select):
  """nnx filter: parameters whose '/'-joined path matches `select` (regex search or predicate)."""
  if select is None:
    match = lambda name: True
  elif isinstance(select, str):
    pattern = re.compile(select)
    match = lambda name: pattern.search(name) is not None
  elif callable(select):
    match = select
  else:
    raise ValueError(f'select must be None, a regex string or a predicate, got {select!r}')
  return lambda path, x: isinstance(x, nnx.Param) and bool(match(_path_name(path)))


def parameter_names(model: nnx.Module, select: Select = None) -> list[str]:
  """The '/'-joined paths of the model's parameters that `select` picks (e.g. 'layers/1/mlp/w2'),
  in the order their gradients are concatenated in unprojected features.

  `select`: None (all parameters), a regex searched in each path ('layers/1/mlp/|final_norm'), or a
  predicate on the path string. Raises if it picks nothing.
  """
  names = [_path_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, _param_filter(select)))]
  if not names:
    every = [_path_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    raise ValueError(f'select={select!r} matches no parameter; the parameters are {every}')
  return names


# ---------------------------------------------------------------------------------------------
# Random projection


def _check_projection(projection_dim: int, kind: str, chunk_rows: int | None) -> int:
  """Validates the projection settings; returns the chunk size in rows."""
  if not isinstance(projection_dim, int | np.integer) or projection_dim < 1:
    raise ValueError(
      f'projection_dim must be an int >= 1 (or None: no projection), got {projection_dim!r}'
    )
  if kind not in PROJECTIONS:
    raise ValueError(f'projection kind {kind!r} is not one of {list(PROJECTIONS)}')
  if chunk_rows is None:
    return max(1, _CHUNK_ELEMENTS // int(projection_dim))
  if not isinstance(chunk_rows, int | np.integer) or chunk_rows < 1:
    raise ValueError(f'chunk_rows must be an int >= 1, got {chunk_rows!r}')
  return int(chunk_rows)


def _random_block(key, rows: int, dim: int, kind: str) -> jax.Array:
  if kind == 'rademacher':
    return jax.random.rademacher(key, (rows, dim), dtype=jnp.float32)
  return jax.random.normal(key, (rows, dim), dtype=jnp.float32)


def _project_leaf(g: jax.Array, leaf_key, dim: int, chunk_rows: int, kind: str) -> jax.Array:
  """g [B, d] @ R [d, dim] (unscaled), R generated in row chunks of min(chunk_rows, d)."""
  batch, d = g.shape
  rows = min(chunk_rows, d)
  full, rest = divmod(d, rows)
  chunks = g[:, : full * rows].reshape(batch, full, rows).transpose(1, 0, 2)

  def step(acc, xs):
    c, g_c = xs
    block = _random_block(jax.random.fold_in(leaf_key, c), rows, dim, kind)
    return acc + g_c @ block, None

  acc = jnp.zeros((batch, dim), jnp.float32)
  acc, _ = jax.lax.scan(step, acc, (jnp.arange(full, dtype=jnp.uint32), chunks))
  if rest:
    block = _random_block(jax.random.fold_in(leaf_key, full), rest, dim, kind)
    acc = acc + g[:, full * rows :] @ block
  return acc


def random_projection(
  leaves: Sequence[jax.Array],
  leaf_ids: Sequence[int],
  *,
  projection_dim: int,
  seed,
  kind: str = 'rademacher',
  chunk_rows: int | None = None,
) -> jax.Array:
  """JL projection of vectors split into leaves: sum_i leaves[i] @ R_i / sqrt(projection_dim).

  leaves: [B, d_i] arrays (the flattened gradient of parameter leaf i for B examples); leaf_ids:
  one int per leaf naming its matrix R_i [d_i, projection_dim], generated from
  `fold_in(key(seed), leaf_id)` in row chunks of `chunk_rows` (default 2^24 // projection_dim), so
  only chunk_rows x projection_dim random numbers exist at a time. Traceable (`seed` may be traced);
  deterministic given (seed, leaf_ids, projection_dim, kind, chunk_rows). -> [B, projection_dim]
  float32.
  """
  rows = _check_projection(projection_dim, kind, chunk_rows)
  if len(leaves) != len(leaf_ids) or not leaves:
    raise ValueError(
      f'need one leaf id per leaf and at least one leaf, got {len(leaves)} leaves and {len(leaf_ids)} ids'
    )
  if any(jnp.ndim(g) != 2 or jnp.shape(g)[0] != jnp.shape(leaves[0])[0] for g in leaves):
    raise ValueError(
      f'leaves must be [B, d_i] with one B, got shapes {[jnp.shape(g) for g in leaves]}'
    )
  key = jax.random.key(seed)
  out = 0.0
  for g, i in zip(leaves, leaf_ids, strict=True):
    leaf = jnp.asarray(g, jnp.float32)
    out = out + _project_leaf(leaf, jax.random.fold_in(key, i), int(projection_dim), rows, kind)
  return out / math.sqrt(projection_dim)


# ---------------------------------------------------------------------------------------------
# Per-example gradient features


def _example_loss(selected, rest, tokens, loss_mask, *, graphdef):
  """Mean next-token NLL of one row [L] over its masked targets (0 when none)."""
  model = nnx.merge(graphdef, selected, rest)
  logits, _ = model(tokens[None])
  targets = jnp.concatenate([tokens[1:], jnp.zeros_like(tokens[:1])])
  nll, _ = token_cross_entropy(logits[0], targets)
  mask = (loss_mask != 0).at[-1].set(False).astype(jnp.float32)
  return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@functools.partial(
  jax.jit, static_argnames=('graphdef', 'leaf_ids', 'projection_dim', 'kind', 'chunk_rows')
)
def _batch_features(
  selected, rest, seed, tokens, loss_mask, *, graphdef, leaf_ids, projection_dim, kind, chunk_rows
):
  grad = jax.vmap(
    jax.grad(functools.partial(_example_loss, graphdef=graphdef)), in_axes=(None, None, 0, 0)
  )
  grads = grad(selected, rest, tokens, loss_mask)
  leaves = [g.reshape(g.shape[0], -1).astype(jnp.float32) for g in jax.tree.leaves(grads)]
  if projection_dim is None:
    return jnp.concatenate(leaves, axis=1)
  return random_projection(
    leaves, leaf_ids, projection_dim=projection_dim, seed=seed, kind=kind, chunk_rows=chunk_rows
  )


def _check_rows(tokens, loss_mask, what: str) -> tuple[np.ndarray, np.ndarray]:
  tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f'{what}: tokens must be [N, L] with L >= 2, got shape {tokens.shape}')
  if loss_mask.shape != tokens.shape:
    raise ValueError(f'{what}: loss_mask shape {loss_mask.shape} != tokens shape {tokens.shape}')
  if not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'{what}: tokens must be integer token ids, got dtype {tokens.dtype}')
  empty = np.flatnonzero(~(loss_mask[:, :-1] != 0).any(axis=1))
  if empty.size:
    raise ValueError(
      f'{what}: rows {empty[:10].tolist()} have no masked target (loss_mask is target-aligned: '
      'column t selects the prediction of token t + 1; the last column is ignored)'
    )
  return tokens.astype(np.int32), loss_mask


def _array_batches(tokens, loss_mask, batch_size: int):
  tokens, loss_mask = _check_rows(tokens, loss_mask, 'example_gradient_features')
  for lo in range(0, len(tokens), batch_size):
    yield tokens[lo : lo + batch_size], loss_mask[lo : lo + batch_size]


def gradient_features_from_batches(
  model: nnx.Module,
  batches: Iterable[tuple[np.ndarray, np.ndarray]],
  *,
  select: Select = None,
  projection_dim: int | None = 8192,
  seed: int = 0,
  batch_size: int = 16,
  kind: str = 'rademacher',
  chunk_rows: int | None = None,
  return_mean: bool = False,
):
  """`example_gradient_features` of examples streamed as (tokens [b, L], loss_mask [b, L]) batches
  (b <= batch_size; L may change between batches, one compilation per L).

  Batches are padded to `batch_size` rows, so each width compiles once; only one batch's
  per-example gradients (batch_size x the selected parameters) exist at a time.
  """
  if not isinstance(batch_size, int | np.integer) or batch_size < 1:
    raise ValueError(f'batch_size must be an int >= 1, got {batch_size!r}')
  if projection_dim is not None:
    chunk_rows = _check_projection(projection_dim, kind, chunk_rows)
  order = {p: i for i, (p, _) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param)))}
  parameter_names(model, select)  # raises when `select` picks nothing
  graphdef, selected, rest = nnx.split(model, _param_filter(select), ...)
  leaf_ids = tuple(order[p] for p, _ in nnx.to_flat_state(selected))
  static = dict(
    graphdef=graphdef,
    leaf_ids=leaf_ids,
    projection_dim=None if projection_dim is None else int(projection_dim),
    kind=kind,
    chunk_rows=chunk_rows,
  )
  if not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an int in [0, 2^32), got {seed!r}')
  seed = jnp.asarray(seed, jnp.uint32)
  out = []
  for tokens, loss_mask in batches:
    tokens, loss_mask = _check_rows(tokens, loss_mask, 'gradient_features_from_batches')
    n = len(tokens)
    if n > batch_size:
      raise ValueError(f'a batch has {n} rows, more than batch_size={batch_size}')
    pad = ((0, batch_size - n), (0, 0))
    feats = _batch_features(
      selected, rest, seed, np.pad(tokens, pad), np.pad(loss_mask, pad), **static
    )
    out.append(np.asarray(feats[:n], np.float32))
  if not out:
    raise ValueError('no examples: the batches were empty')
  features = np.concatenate(out)
  if return_mean:
    return features, features.mean(axis=0, dtype=np.float64).astype(np.float32)
  return features


def example_gradient_features(
  model: nnx.Module,
  tokens,
  loss_mask,
  *,
  select: Select = None,
  projection_dim: int | None = 8192,
  seed: int = 0,
  batch_size: int = 16,
  kind: str = 'rademacher',
  chunk_rows: int | None = None,
  return_mean: bool = False,
):
  """Per-example projected gradients of the mean answer-token NLL: float32 [N, projection_dim].

  Args:
    model: LM following the Transformer API (`model(tokens) -> (logits, extras)`); not modified.
    tokens: [N, L] int token ids, right-padded.
    loss_mask: [N, L] target-aligned mask of the answer tokens (module docstring); every row needs
      at least one masked target.
    select: which parameters the gradient covers (see `parameter_names`), e.g. 'layers/3/' or
      'embed' (the tied output head); None = all.
    projection_dim: output dimension p of the JL projection; None = no projection (the full
      flattened gradient of the selected leaves, in `parameter_names` order).
    seed: the projection's seed (the same seed gives the same projection for every batch and call).
    batch_size: examples per vmapped gradient call (memory: batch_size x the selected parameters).
    kind: 'rademacher' or 'gaussian' projection entries.
    chunk_rows: rows of the projection generated at a time (see `random_projection`).
    return_mean: also return the mean feature over the N examples (= the projected mean gradient,
      the default gradient-matching target).

  Returns:
    features [N, p] float32, or (features, mean [p]) with `return_mean`.
  """
  # batch_size is checked by gradient_features_from_batches before it draws the first batch.
  return gradient_features_from_batches(
    model,
    _array_batches(tokens, loss_mask, batch_size),
    select=select,
    projection_dim=projection_dim,
    seed=seed,
    batch_size=batch_size,
    kind=kind,
    chunk_rows=chunk_rows,
    return_mean=return_mean,
  )


@functools.partial(jax.jit, static_argnames='graphdef')
def _batch_embeddings(graphdef, state, tokens, mask):
  hidden, _ = nnx.merge(graphdef, state)(tokens, return_hidden=True)
  weights = (mask != 0).astype(jnp.float32)
  total = jnp.einsum('bl,bld->bd', weights, hidden.astype(jnp.float32))
  return total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)


def example_embeddings(model: nnx.Module, tokens, mask, *, batch_size: int = 16) -> np.ndarray:
  """Mean final (normalised) hidden state over the positions where `mask` is nonzero: float32
  [N, d_model], computed batch by batch (padded to `batch_size`, one compilation per width)."""
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(
      f'tokens [N, L] and mask [N, L] must match, got {tokens.shape} and {mask.shape}'
    )
  if not len(tokens):
    raise ValueError('example_embeddings: no examples')
  if not isinstance(batch_size, int | np.integer) or batch_size < 1:
    raise ValueError(f'batch_size must be an int >= 1, got {batch_size!r}')
  empty = np.flatnonzero(~(mask != 0).any(axis=1))
  if empty.size:
    raise ValueError(f'example_embeddings: rows {empty[:10].tolist()} have an empty mask')
  graphdef, state = nnx.split(model)
  out = []
  for lo in range(0, len(tokens), batch_size):
    t, m = tokens[lo : lo + batch_size].astype(np.int32), mask[lo : lo + batch_size]
    pad = ((0, batch_size - len(t)), (0, 0))
    emb = _batch_embeddings(graphdef, state, np.pad(t, pad), np.pad(m, pad))
    out.append(np.asarray(emb[: len(t)], np.float32))
  return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Selection


def _check_k(k, n: int, what: str) -> int:
  if n < 1:
    raise ValueError(f'{what}: the candidate set is empty')
  if not isinstance(k, int | np.integer) or not 1 <= k <= n:
    raise ValueError(f'{what}: k must be an int in [1, {n}] (the number of candidates), got {k!r}')
  return int(k)


def select_gradient_matching(features, k: int, target=None) -> tuple[np.ndarray, np.ndarray]:
  """Greedy forward selection of k distinct rows whose mean feature best matches `target`.

  Each step adds the row that minimises |mean(selected) - target| (ties: the lowest index), in
  O(N D) per step. features: [N, D]; target: [D], default the mean of all rows (the full-set
  gradient). The objective usually falls as rows are added but is not forced to (after a row equal
  to the target, any addition raises it); pick the prefix with the lowest objective if needed.

  Returns:
    (indices [k] int64 in selection order, objective [k] float64: after each addition,
    |mean(selected) - target| / |target|, or the absolute distance when target is 0).
  """
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[1] < 1:
    raise ValueError(f'features must be [N, D] with D >= 1, got shape {f.shape}')
  k = _check_k(k, f.shape[0], 'select_gradient_matching')
  t = f.mean(axis=0) if target is None else np.asarray(target, np.float64)
  if t.shape != f.shape[1:]:
    raise ValueError(f'target shape {t.shape} != feature shape {f.shape[1:]}')
  if not (np.isfinite(f).all() and np.isfinite(t).all()):
    raise ValueError('features and target must be finite')
  scale = np.linalg.norm(t) or 1.0
  sq_norms = np.einsum('nd,nd->n', f, f)
  taken = np.zeros(len(f), bool)
  total = np.zeros_like(t)
  indices, objective = [], []
  for j in range(1, k + 1):
    # |total + f_i - j t|^2 = |r|^2 + 2 r.f_i + |f_i|^2, r = total - j t.
    r = total - j * t
    cost = np.where(taken, np.inf, 2.0 * (f @ r) + sq_norms)
    i = int(np.argmin(cost))
    taken[i] = True
    total += f[i]
    indices.append(i)
    objective.append(np.linalg.norm(total / j - t) / scale)
  return np.asarray(indices, np.int64), np.asarray(objective, np.float64)


def select_random(n: int, k: int, seed: int) -> np.ndarray:
  """k distinct indices in [0, n) drawn uniformly (int64, in draw order)."""
  k = _check_k(k, n, 'select_random')
  return np.random.default_rng(seed).choice(n, size=k, replace=False).astype(np.int64)


def text_ngrams(text: str, *, unit: str = 'word', n: int = 1) -> list[str]:
  """Lower-cased n-grams of whitespace tokens (unit='word') or of characters (unit='char', runs
  of whitespace collapsed to one space)."""
  if unit not in ('word', 'char'):
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
  if not isinstance(n, int) or n < 1:
    raise ValueError(f'n must be an int >= 1, got {n!r}')
  words = text.lower().split()
  units = words if unit == 'word' else list(' '.join(words))
  joiner = ' ' if unit == 'word' else ''
  return [joiner.join(units[i : i + n]) for i in range(len(units) - n + 1)]


def bm25_scores(
  train_texts: Sequence[str],
  query_texts: Sequence[str],
  *,
  unit: str = 'word',
  n: int = 1,
  k1: float = 1.5,
  b: float = 0.75,
) -> np.ndarray:
  """Okapi BM25 of each training text against the queries taken together: float64 [N].

  score(d) = sum over queries q, over the distinct terms t of q, of
  idf(t) * tf(t, d) (k1 + 1) / (tf(t, d) + k1 (1 - b + b |d| / avgdl)),
  idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)) (non-negative), with df and avgdl over the
  N training texts and terms from `text_ngrams(unit, n)`.
  """
  if not len(train_texts):
    raise ValueError('bm25_scores: no training texts')
  if not len(query_texts):
    raise ValueError('bm25_scores: no query texts')
  docs = [Counter(text_ngrams(t, unit=unit, n=n)) for t in train_texts]
  lengths = np.array([sum(d.values()) for d in docs], np.float64)
  avgdl = lengths.mean() or 1.0
  df = Counter(term for d in docs for term in d)
  num = len(docs)
  query_terms = Counter(t for q in query_texts for t in set(text_ngrams(q, unit=unit, n=n)))
  norm = k1 * (1.0 - b + b * lengths / avgdl)
  scores = np.zeros(num)
  for term, count in query_terms.items():
    if term not in df:
      continue
    idf = math.log(1.0 + (num - df[term] + 0.5) / (df[term] + 0.5))
    tf = np.array([d.get(term, 0) for d in docs], np.float64)
    scores += count * idf * tf * (k1 + 1.0) / (tf + norm)
  return scores


def select_ngram_similarity(
  train_texts: Sequence[str],
  query_texts: Sequence[str],
  k: int,
  *,
  unit: str = 'word',
  n: int = 1,
  k1: float = 1.5,
  b: float = 0.75,
) -> np.ndarray:
  """The k training texts with the highest `bm25_scores` against the queries (int64, best first;
  ties: the lowest index)."""
  k = _check_k(k, len(train_texts), 'select_ngram_similarity')
  scores = bm25_scores(train_texts, query_texts, unit=unit, n=n, k1=k1, b=b)
  return np.argsort(-scores, kind='stable')[:k].astype(np.int64)


def _sq_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
  d = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]
  return np.maximum(d, 0.0)


def kmeans(points, k: int, seed: int, *, iterations: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """k-means++ initialisation then up to `iterations` Lloyd steps (stops when assignments settle;
  an empty cluster keeps its centre). -> (centres [k, D] float64, labels [N] int64)."""
  x = np.asarray(points, np.float64)
  if x.ndim != 2 or x.shape[1] < 1:
    raise ValueError(f'points must be [N, D] with D >= 1, got shape {x.shape}')
  k = _check_k(k, x.shape[0], 'kmeans')
  if not isinstance(iterations, int) or iterations < 1:
    raise ValueError(f'iterations must be an int >= 1, got {iterations!r}')
  if not np.isfinite(x).all():
    raise ValueError('points must be finite')
  rng = np.random.default_rng(seed)
  chosen = [int(rng.integers(len(x)))]
  closest = _sq_distances(x, x[chosen])[:, 0]
  for _ in range(1, k):
    if closest.sum() > 0:
      i = int(rng.choice(len(x), p=closest / closest.sum()))
    else:  # every point coincides with a centre: any point not yet taken
      i = int(rng.choice(np.setdiff1d(np.arange(len(x)), chosen)))
    chosen.append(i)
    closest = np.minimum(closest, _sq_distances(x, x[i : i + 1])[:, 0])
  centers = x[chosen].copy()
  labels = None
  for _ in range(iterations):
    new = np.argmin(_sq_distances(x, centers), axis=1)
    if labels is not None and np.array_equal(new, labels):
      break
    labels = new
    for c in range(k):
      members = x[labels == c]
      if len(members):
        centers[c] = members.mean(axis=0)
  labels = np.argmin(_sq_distances(x, centers), axis=1)
  return centers, labels.astype(np.int64)


def select_kmeans(embeddings, k: int, seed: int, *, iterations: int = 10) -> np.ndarray:
  """One example per k-means cluster of `embeddings` [N, D]: for each centre in turn, the nearest
  example not already chosen (int64 [k], distinct)."""
  x = np.asarray(embeddings, np.float64)
  centers, _ = kmeans(x, k, seed, iterations=iterations)
  dist = _sq_distances(x, centers)
  picked: list[int] = []
  for c in range(len(centers)):
    d = dist[:, c].copy()
    d[picked] = np.inf
    picked.append(int(np.argmin(d)))
  return np.asarray(picked, np.int64)
