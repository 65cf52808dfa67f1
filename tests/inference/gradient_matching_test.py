"""Gradient-matching demonstration selection: per-example gradients against separate jax.grad calls,
the projection against its materialised matrix and the JL bound, streaming determinism, planted
selections, BM25 against the formula by hand, k-means on planted clusters, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax.inference import gradient_matching as gm
from kuaijax.losses.lm import lm_loss
from kuaijax.models.transformer import Transformer, TransformerConfig

CONFIG = TransformerConfig(
  vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32, init_std=0.3
)
SELECT = 'layers/1/mlp/|final_norm'
N, L = 5, 8


@pytest.fixture(scope='module')
def model():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CONFIG.vocab_size, size=(N, L)).astype(np.int32)
  mask = np.zeros((N, L), np.int32)
  for r, (lo, hi) in enumerate([(2, 6), (4, 7), (0, 3), (5, 6), (3, 7)]):
    mask[r, lo:hi] = 1
  mask[2, -1] = 1  # the last column has no target: ignored
  return tokens, mask


@pytest.fixture(scope='module')
def exact_features(model, data):
  return gm.example_gradient_features(
    model, *data, select=SELECT, projection_dim=None, batch_size=2
  )


def _single_example_grad(model, tokens, mask, names):
  """jax.grad of one row's masked mean NLL w.r.t. all parameters, the `names` leaves flattened."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  targets = np.concatenate([tokens[1:], [0]])[None]
  target_mask = mask.copy()[None]
  target_mask[:, -1] = 0

  def loss(p):
    logits, _ = nnx.merge(graphdef, p, rest)(jnp.asarray(tokens)[None])
    return lm_loss(logits, targets, target_mask)[0]

  grads = dict(nnx.to_flat_state(jax.grad(loss)(params)))
  flat = {'/'.join(map(str, path)): g for path, g in grads.items()}
  return np.concatenate([np.ravel(flat[name][...]) for name in names])


def test_parameter_names_select(model):
  assert gm.parameter_names(model, SELECT) == [
    'final_norm/scale',
    'layers/1/mlp/w1',
    'layers/1/mlp/w2',
    'layers/1/mlp/w3',
  ]
  assert gm.parameter_names(model, lambda name: name.endswith('wq')) == [
    'layers/0/attn/wq',
    'layers/1/attn/wq',
  ]
  assert len(gm.parameter_names(model)) == 20


def test_unprojected_features_equal_single_example_grads(model, data, exact_features):
  tokens, mask = data
  names = gm.parameter_names(model, SELECT)
  assert exact_features.shape == (N, 16 + 3 * 16 * 32)
  assert exact_features.dtype == np.float32
  for r in range(N):
    want = _single_example_grad(model, tokens[r], mask[r], names)
    np.testing.assert_allclose(exact_features[r], want, atol=1e-5, rtol=1e-4)
  assert np.abs(exact_features).max() > 1e-3  # nontrivial gradients


def _projection_matrix(model, projection_dim, seed, chunk_rows, kind='rademacher'):
  """The [D, p] matrix the features use, materialised leaf by leaf from identity inputs."""
  every = gm.parameter_names(model)
  names = gm.parameter_names(model, SELECT)
  flat = {'/'.join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  blocks = [
    gm.random_projection(
      [jnp.eye(flat[name][...].size)],
      [every.index(name)],
      projection_dim=projection_dim,
      seed=seed,
      kind=kind,
      chunk_rows=chunk_rows,
    )
    for name in names
  ]
  return np.concatenate(blocks)


def test_projected_features_are_the_materialised_projection(model, data, exact_features):
  p, chunk_rows = 64, 100  # 512-row leaves: 5 full chunks and a remainder of 12
  matrix = _projection_matrix(model, p, seed=3, chunk_rows=chunk_rows)
  assert matrix.shape == (exact_features.shape[1], p)
  np.testing.assert_allclose(np.abs(matrix), 1 / math.sqrt(p), rtol=1e-6)  # Rademacher
  assert abs(np.sign(matrix).mean()) < 0.05
  # No two rows alike: every chunk and every leaf has its own random block.
  assert len(np.unique(np.sign(matrix), axis=0)) == len(matrix)
  projected, mean = gm.example_gradient_features(
    model,
    *data,
    select=SELECT,
    projection_dim=p,
    seed=3,
    batch_size=2,
    chunk_rows=chunk_rows,
    return_mean=True,
  )
  np.testing.assert_allclose(projected, exact_features @ matrix, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(mean, projected.mean(0), atol=1e-6)
  other_seed = _projection_matrix(model, p, seed=4, chunk_rows=chunk_rows)
  assert np.mean(np.sign(other_seed) == np.sign(matrix)) < 0.6


def test_projection_preserves_inner_products_within_jl_bound():
  p = 512
  rng = np.random.default_rng(1)
  x = rng.normal(size=(20, 300)).astype(np.float32)
  x[:10] += 0.8 * x[10:]  # correlated pairs as well as near-orthogonal ones
  leaves = [jnp.asarray(x[:, :100]), jnp.asarray(x[:, 100:])]
  for kind in gm.PROJECTIONS:
    y = np.asarray(gm.random_projection(leaves, [0, 7], projection_dim=p, seed=0, kind=kind))
    norms_x, norms_y = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    assert np.abs(norms_y / norms_x - 1).max() < 3 / math.sqrt(p)
    gram_err = np.abs(y @ y.T - x @ x.T) / np.outer(norms_x, norms_x)
    assert gram_err.max() < 5 / math.sqrt(p)
    assert gram_err.max() > 0.1 / math.sqrt(p)  # a projection, not a copy


def test_streaming_is_deterministic(model, data):
  tokens, mask = data
  kwargs = dict(select=SELECT, projection_dim=32, seed=5, chunk_rows=200)
  one_batch = gm.example_gradient_features(model, tokens, mask, batch_size=N, **kwargs)
  batched = gm.example_gradient_features(model, tokens, mask, batch_size=2, **kwargs)
  np.testing.assert_allclose(batched, one_batch, atol=1e-6, rtol=1e-5)
  # The same rows streamed as batches of another width (right padding outside the mask).
  wide_t, wide_m = np.pad(tokens, ((0, 0), (0, 3))), np.pad(mask, ((0, 0), (0, 3)))
  batches = [(tokens[:3], mask[:3]), (wide_t[3:], wide_m[3:])]
  streamed = gm.gradient_features_from_batches(model, iter(batches), batch_size=N, **kwargs)
  np.testing.assert_allclose(streamed, one_batch, atol=1e-6, rtol=1e-5)
  again = gm.example_gradient_features(model, tokens, mask, batch_size=2, **kwargs)
  np.testing.assert_array_equal(again, batched)


def test_example_embeddings_are_masked_mean_hidden_states(model, data):
  tokens, mask = data
  emb = gm.example_embeddings(model, tokens, mask, batch_size=2)
  hidden, _ = model(jnp.asarray(tokens), return_hidden=True)
  hidden = np.asarray(hidden, np.float64)
  want = [hidden[r][mask[r] != 0].mean(axis=0) for r in range(N)]
  assert emb.shape == (N, CONFIG.d_model) and emb.dtype == np.float32
  np.testing.assert_allclose(emb, np.stack(want), atol=1e-5)


def test_gradient_matching_recovers_planted_subset():
  rng = np.random.default_rng(2)
  n, d, k = 40, 16, 5
  target = rng.normal(size=d)
  offsets = rng.normal(size=(k, d)) * 0.5
  offsets -= offsets.mean(axis=0)  # the planted rows' mean is the target exactly
  features = target + rng.normal(size=(n, d)) * 20.0  # the others: far off
  planted = rng.choice(n, size=k, replace=False)
  features[planted] = target + offsets
  indices, objective = gm.select_gradient_matching(features, k, target)
  assert sorted(indices.tolist()) == sorted(planted.tolist())
  assert objective.shape == (k,) and objective[-1] < 1e-12
  assert objective[0] > 0.1


def test_gradient_matching_greedy_steps_and_default_target():
  rng = np.random.default_rng(3)
  features = rng.normal(size=(200, 64)) + 0.3
  target = features.mean(axis=0)
  indices, objective = gm.select_gradient_matching(features, 10)
  assert len(set(indices.tolist())) == 10
  # Non-increasing on this random set (not in general: after a row equal to the target, any
  # addition raises it).
  assert np.all(np.diff(objective) <= 1e-12)
  # Every step is the best single addition, and the objective is what it says.
  chosen = []
  for j, i in enumerate(indices):
    errors = [
      np.inf if c in chosen else np.linalg.norm(features[chosen + [c]].mean(0) - target)
      for c in range(len(features))
    ]
    assert i == int(np.argmin(errors))
    chosen.append(int(i))
    assert objective[j] == pytest.approx(errors[i] / np.linalg.norm(target), rel=1e-9)


def test_select_random():
  a = gm.select_random(50, 10, seed=0)
  assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 50
  np.testing.assert_array_equal(a, gm.select_random(50, 10, seed=0))
  assert not np.array_equal(a, gm.select_random(50, 10, seed=1))
  assert sorted(gm.select_random(4, 4, seed=2).tolist()) == [0, 1, 2, 3]


def test_bm25_against_hand_computed_scores():
  docs = ['the cat sat', 'The dog sat on the mat', 'a zebra ran']
  # N = 3, avgdl = (3 + 6 + 3) / 3 = 4; df(the) = 2, df(zebra) = 1; k1 = 1.5, b = 0.75.
  idf_the = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
  idf_zebra = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
  norm_short = 1.5 * (1 - 0.75 + 0.75 * 3 / 4)
  norm_long = 1.5 * (1 - 0.75 + 0.75 * 6 / 4)
  want = [
    idf_the * 1 * 2.5 / (1 + norm_short),
    idf_the * 2 * 2.5 / (2 + norm_long),
    idf_zebra * 1 * 2.5 / (1 + norm_short),
  ]
  np.testing.assert_allclose(gm.bm25_scores(docs, ['zebra THE']), want, rtol=1e-12)
  # Queries taken together: the sum of their scores.
  np.testing.assert_allclose(gm.bm25_scores(docs, ['zebra', 'the']), want, rtol=1e-12)
  assert gm.select_ngram_similarity(docs, ['zebra the'], 3).tolist() == [2, 1, 0]
  assert gm.select_ngram_similarity(docs, ['the dog'], 1).tolist() == [1]
  assert gm.bm25_scores(docs, ['unseen words']).tolist() == [0.0, 0.0, 0.0]


def test_text_ngrams():
  assert gm.text_ngrams('A  b\tc', n=2) == ['a b', 'b c']
  assert gm.text_ngrams('Ab  c', unit='char', n=2) == ['ab', 'b ', ' c']
  scores = gm.bm25_scores(['zebras run', 'cats sit'], ['zebra'], unit='char', n=3)
  assert scores[0] > 0 and scores[1] == 0


def test_kmeans_recovers_planted_clusters():
  rng = np.random.default_rng(4)
  centers = np.array([[10.0, 0, 0], [-10, 0, 0], [0, 10, 0], [0, 0, -10]])
  truth = np.repeat(np.arange(4), 15)
  points = centers[truth] + rng.normal(size=(60, 3)) * 0.3
  perm = rng.permutation(60)
  points, truth = points[perm], truth[perm]
  for seed in range(3):
    found, labels = gm.kmeans(points, 4, seed)
    # The same partition (up to renaming) and centres at the planted ones.
    assert len({(t, lab) for t, lab in zip(truth, labels, strict=True)}) == 4
    np.testing.assert_allclose(np.sort(found, axis=0), np.sort(centers, axis=0), atol=0.3)
    picked = gm.select_kmeans(points, 4, seed)
    assert sorted(truth[picked].tolist()) == [0, 1, 2, 3]


def test_select_kmeans_distinct_with_duplicate_points():
  points = np.zeros((5, 2))
  picked = gm.select_kmeans(points, 3, seed=0)
  assert len(set(picked.tolist())) == 3


def test_bad_input(model, data):
  tokens, mask = data
  features = np.ones((4, 3))
  with pytest.raises(ValueError, match='k must be an int in'):
    gm.select_gradient_matching(features, 5)
  with pytest.raises(ValueError, match='k must be an int in'):
    gm.select_gradient_matching(features, 0)
  with pytest.raises(ValueError, match='features must be'):
    gm.select_gradient_matching(np.ones(4), 1)
  with pytest.raises(ValueError, match='target shape'):
    gm.select_gradient_matching(features, 2, target=np.ones(4))
  with pytest.raises(ValueError, match='candidate set is empty'):
    gm.select_gradient_matching(np.ones((0, 3)), 1)
  with pytest.raises(ValueError, match='k must be an int in'):
    gm.select_random(3, 4, seed=0)
  with pytest.raises(ValueError, match='k must be an int in'):
    gm.select_ngram_similarity(['a', 'b'], ['a'], 3)
  with pytest.raises(ValueError, match='no query texts'):
    gm.select_ngram_similarity(['a', 'b'], [], 1)
  with pytest.raises(ValueError, match='candidate set is empty'):
    gm.select_ngram_similarity([], ['a'], 1)
  with pytest.raises(ValueError, match='unit must be'):
    gm.bm25_scores(['a'], ['a'], unit='byte')
  with pytest.raises(ValueError, match='k must be an int in'):
    gm.select_kmeans(features, 5, seed=0)
  with pytest.raises(ValueError, match='points must be'):
    gm.select_kmeans(np.ones(4), 1, seed=0)
  with pytest.raises(ValueError, match='projection_dim must be an int >= 1'):
    gm.example_gradient_features(model, tokens, mask, projection_dim=0)
  with pytest.raises(ValueError, match='projection kind'):
    gm.example_gradient_features(model, tokens, mask, projection_dim=4, kind='sparse')
  with pytest.raises(ValueError, match='matches no parameter'):
    gm.example_gradient_features(model, tokens, mask, select='no_such_layer')
  with pytest.raises(ValueError, match='loss_mask shape'):
    gm.example_gradient_features(model, tokens, mask[:, :-1])
  with pytest.raises(ValueError, match=r'rows \[1\] have no masked target'):
    empty = mask.copy()
    empty[1] = 0
    empty[1, -1] = 1  # the last column has no target
    gm.example_gradient_features(model, tokens, empty)
  with pytest.raises(ValueError, match='no examples'):
    gm.example_gradient_features(model, tokens[:0], mask[:0])
  with pytest.raises(ValueError, match='more than batch_size'):
    gm.gradient_features_from_batches(model, [(tokens, mask)], batch_size=2, projection_dim=4)
  with pytest.raises(ValueError, match='batch_size must be'):
    gm.example_gradient_features(model, tokens, mask, batch_size=0)
  with pytest.raises(ValueError, match='empty mask'):
    gm.example_embeddings(model, tokens, np.zeros_like(mask))
  with pytest.raises(ValueError, match='need one leaf id per leaf'):
    gm.random_projection([jnp.ones((2, 3))], [0, 1], projection_dim=4, seed=0)


def test_per_example_gradients_match_torch_on_an_imported_model(tmp_path):
  """On a Llama checkpoint loaded by kuaijax and by transformers, the per-example gradients of the
  mean answer-token NLL have the same norms and pairwise inner products (invariant to how the two
  libraries name, order and transpose their parameters)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from experiments.bench_hf import write_random_llama
  from kuaijax.hf import model_io

  folder = str(tmp_path / 'llama')
  shape = dict(vocab_size=64, d_model=32, num_layers=2, d_ff=64, num_heads=4, num_kv_heads=2)
  write_random_llama(folder, {**shape, 'tie_embeddings': False}, seed=3)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 64, (3, 10)).astype(np.int32)
  mask = np.zeros((3, 10), np.float32)
  mask[0, 4:9], mask[1, 6:9], mask[2, 2:5] = 1, 1, 1
  ours = gm.example_gradient_features(
    model_io.load_model(folder), tokens, mask, projection_dim=None
  )
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
  theirs = []
  for row, m in zip(tokens, mask):
    hf.zero_grad()
    logits = hf(torch.tensor(row[None], dtype=torch.long)).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(
      logits, torch.tensor(row[1:], dtype=torch.long), reduction='none'
    )
    weight = torch.tensor(m[:-1])
    ((nll * weight).sum() / weight.sum()).backward()
    theirs.append(torch.cat([p.grad.flatten() for p in hf.parameters()]).numpy())
  theirs = np.stack(theirs).astype(np.float64)
  assert ours.shape == theirs.shape
  gram_ours, gram_theirs = ours.astype(np.float64) @ ours.T, theirs @ theirs.T
  np.testing.assert_allclose(gram_ours, gram_theirs, rtol=1e-4)
