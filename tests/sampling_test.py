"""Generation with the KV cache against full recomputation, sampling filters, scoring, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax import parallel, sampling
from kuaijax.models.transformer import Transformer, TransformerConfig

VOCAB = 29
T = 6  # max_new_tokens used throughout, so most tests share compiled programs


# A large init_std makes the random model's next-token distributions peaked, so greedy, top-k and
# top-p differ from each other and from uniform sampling.
CONFIG = TransformerConfig(
  vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=32, init_std=0.5
)


@pytest.fixture(scope='module')
def model():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


PROMPT_LENGTHS = np.array([5, 2, 7, 3], np.int32)


def right_padded(lengths=PROMPT_LENGTHS, width=7, seed=1, pad=0):
  rng = np.random.default_rng(seed)
  prompts = np.full((len(lengths), width), pad, np.int32)
  for i, n in enumerate(lengths):
    prompts[i, :n] = rng.integers(1, VOCAB, n)
  return prompts


def to_left(prompts, lengths, pad=0):
  out = np.full_like(prompts, pad)
  for i, n in enumerate(lengths):
    out[i, prompts.shape[1] - n :] = prompts[i, :n]
  return out


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, state, tokens, segment_ids, positions):
  return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, positions=positions)[0]


def full_forward(model, tokens, segment_ids=None, positions=None):
  """Logits of whole sequences with no cache (one compiled program per shape)."""
  b, length = tokens.shape
  if segment_ids is None:
    segment_ids = np.ones((b, length), np.int32)
  if positions is None:
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
  return _full_forward(*nnx.split(model), jnp.asarray(tokens), segment_ids, positions)


@functools.partial(jax.jit, static_argnums=0, static_argnames=('fn', 'padding'))
def _jit_score(graphdef, state, *args, fn, **kwargs):
  return getattr(sampling, fn)(nnx.merge(graphdef, state), *args, **kwargs)


def jit_score(fn, model, *args, **kwargs):
  """`sampling.score` / `score_completions` under jit, as trainers call them."""
  return _jit_score(*nnx.split(model), *args, fn=fn, **kwargs)


def recompute_reference(model, prompts, lengths, rng, *, num_samples=1, stop_tokens=(), **kw):
  """Generation without a cache: every step re-runs the model over each row's whole sequence."""
  rows = np.arange(len(lengths) * num_samples)
  lengths = np.repeat(lengths, num_samples)
  seqs = np.zeros((len(rows), prompts.shape[1] + T), np.int32)
  seqs[:, : prompts.shape[1]] = np.repeat(prompts, num_samples, 0)  # unpadded prefix + anything
  tokens, logps, sample_logps = (np.zeros((len(rows), T)) for _ in range(3))
  done = np.zeros(len(rows), bool)
  out_lengths = np.zeros(len(rows), np.int32)
  for t in range(T):
    logits = full_forward(model, seqs)[rows, lengths + t - 1]
    keys = jax.vmap(
      functools.partial(jax.random.fold_in, jax.random.fold_in(jax.random.key(rng), t))
    )(rows)
    tok, lp, slp = map(np.asarray, sampling.sample_logits(logits, keys, **kw))
    tokens[:, t] = np.where(done, 0, tok)
    logps[:, t], sample_logps[:, t] = np.where(done, 0, lp), np.where(done, 0, slp)
    out_lengths += ~done
    seqs[rows, lengths + t] = tok
    done |= np.isin(tok, stop_tokens)
  return tokens, logps, sample_logps, out_lengths


def assert_generation_equal(a, b, atol=1e-5):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.lengths, b.lengths)
  np.testing.assert_array_equal(a.stopped, b.stopped)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol)
  np.testing.assert_allclose(a.sample_logprobs, b.sample_logprobs, atol=atol)


SAMPLED = dict(temperature=0.8, top_k=12, top_p=0.9)


@pytest.mark.parametrize(
  'settings', [dict(greedy=True), SAMPLED], ids=['greedy', 'temperature_topk_topp']
)
def test_cache_generation_equals_full_recomputation(model, settings):
  prompts = right_padded()
  out = sampling.generate(
    model, prompts, PROMPT_LENGTHS, rng=3, max_new_tokens=T, num_samples=2, **settings
  )
  ref_tokens, ref_logps, ref_sample_logps, ref_lengths = recompute_reference(
    model, prompts, PROMPT_LENGTHS, 3, num_samples=2, **settings
  )
  np.testing.assert_array_equal(out.tokens, ref_tokens)
  np.testing.assert_array_equal(out.lengths, ref_lengths)
  np.testing.assert_allclose(out.logprobs, ref_logps, atol=1e-5)
  np.testing.assert_allclose(out.sample_logprobs, ref_sample_logps, atol=1e-5)
  assert len({tuple(row) for row in np.asarray(out.tokens)}) > 2  # not a degenerate model
  if not settings.get('greedy'):  # the filters drop tokens: sampled log-probs exceed the raw ones
    assert (np.asarray(out.sample_logprobs) > np.asarray(out.logprobs) + 1e-3).any()


def test_left_and_right_padding_give_the_same_completions(model):
  prompts = right_padded(pad=7)  # the pad value itself must not matter
  run = functools.partial(sampling.generate, model, rng=3, max_new_tokens=T, num_samples=2)
  right = run(prompts, PROMPT_LENGTHS, **SAMPLED)
  left = run(to_left(prompts, PROMPT_LENGTHS, pad=11), PROMPT_LENGTHS, padding='left', **SAMPLED)
  assert_generation_equal(right, left)


def test_wide_padding_is_trimmed_and_changes_nothing(model):
  """Prompts padded far past their longest row are prefilled and cached at the longest length
  rounded up to a power of two (16 here), with the same completions as a tight padding."""
  prompts = right_padded()
  wide = np.concatenate([prompts, np.full((len(prompts), 57), 5, np.int32)], axis=1)
  assert sampling._prompt_width(PROMPT_LENGTHS, wide.shape[1]) == 16
  assert sampling._prompt_width(np.array([17, 3]), 64) == 32
  assert sampling._prompt_width(np.array([17, 3]), 20) == 20
  run = functools.partial(sampling.generate, model, rng=3, max_new_tokens=T, num_samples=2)
  assert_generation_equal(
    run(prompts, PROMPT_LENGTHS, **SAMPLED), run(wide, PROMPT_LENGTHS, **SAMPLED)
  )
  left = to_left(wide, PROMPT_LENGTHS, pad=11)
  assert_generation_equal(
    run(prompts, PROMPT_LENGTHS, **SAMPLED), run(left, PROMPT_LENGTHS, padding='left', **SAMPLED)
  )


def test_stop_tokens_lengths_and_padding_after_stop(model):
  prompts = right_padded()
  run = functools.partial(sampling.generate, model, max_new_tokens=T, greedy=True, num_samples=2)
  free = run(prompts, PROMPT_LENGTHS)
  free_tokens = np.asarray(free.tokens)
  stop = int(free_tokens[0, 2])
  out = run(prompts, PROMPT_LENGTHS, stop_tokens=(stop,), pad_id=3)
  tokens, logps = np.asarray(out.tokens), np.asarray(out.logprobs)
  for r, row in enumerate(free_tokens):
    hits = np.flatnonzero(row == stop)
    length = hits[0] + 1 if hits.size else T
    assert out.lengths[r] == length and bool(out.stopped[r]) == bool(hits.size)
    np.testing.assert_array_equal(tokens[r, :length], row[:length])  # stop token included
    np.testing.assert_array_equal(tokens[r, length:], 3)
    np.testing.assert_array_equal(logps[r, length:], 0.0)
    np.testing.assert_allclose(logps[r, :length], free.logprobs[r, :length], atol=1e-6)
  assert out.lengths[0] <= 3
  assert out.to_lists()[0] == free_tokens[0, : out.lengths[0]].tolist()


def test_all_rows_stopping_ends_early_with_padding(model):
  run = functools.partial(
    sampling.generate, model, right_padded(), PROMPT_LENGTHS, rng=0, max_new_tokens=T, num_samples=2
  )
  first = set(np.asarray(run(**SAMPLED).tokens)[:, 0].tolist())
  out = run(stop_tokens=first, **SAMPLED)
  np.testing.assert_array_equal(out.lengths, 1)
  assert np.asarray(out.stopped).all()
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 1:], 0)
  np.testing.assert_array_equal(np.asarray(out.sample_logprobs)[:, 1:], 0.0)


@pytest.mark.parametrize(
  'filters', [dict(top_k=1), dict(top_k=12, top_p=1e-6)], ids=['top_k1', 'top_p_tiny']
)
def test_degenerate_filters_equal_greedy(model, filters):
  run = functools.partial(
    sampling.generate, model, right_padded(), PROMPT_LENGTHS, max_new_tokens=T, num_samples=2
  )
  greedy = run(greedy=True)
  out = run(rng=5, temperature=1.3, **filters)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-6)
  np.testing.assert_array_equal(out.sample_logprobs, 0.0)  # a point mass
  np.testing.assert_array_equal(run(temperature=0.0).tokens, greedy.tokens)


def numpy_filter(logits, temperature, top_k, top_p):
  """Independent reference: per row, stable descending sort, keep top-k, then the nucleus."""
  out = np.full(logits.shape, -np.inf)
  for i, row in enumerate(logits / temperature):
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    kept = order[: top_k or len(row)]
    if top_p is not None:
      probs = np.exp(row[kept] - row[kept].max())
      probs /= probs.sum()
      mass, nucleus = 0.0, []
      for j, p in zip(kept, probs):
        if nucleus and mass >= top_p:
          break
        nucleus.append(j)
        mass += p
      kept = nucleus
    out[i, kept] = row[kept]
  return out


@pytest.mark.parametrize(
  'temperature,top_k,top_p',
  [(1.0, None, 0.5), (0.7, None, 0.95), (1.0, 5, None), (2.0, 6, 0.3), (1.0, 3, 1.0), (1, 40, 0.8)],
)
def test_filter_logits_matches_numpy_reference(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(16, 23)) * 2
  logits[0, :4] = logits[0, 4]  # ties are broken towards the lower id
  logits[1] = 0.0  # a flat row
  got = np.asarray(
    sampling.filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  )
  want = numpy_filter(logits.astype(np.float32).astype(np.float64), temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_nucleus_keeps_the_smallest_set_reaching_p():
  probs = np.array([[0.5, 0.3, 0.15, 0.05]])
  logits = np.log(probs)
  kept = lambda p: np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=p)))[0].sum()
  assert [kept(p) for p in (0.1, 0.49, 0.51, 0.79, 0.81, 0.96, 1.0)] == [1, 1, 2, 2, 3, 4, 4]


def test_same_seed_same_samples_different_seed_different(model):
  prompts = right_padded()
  run = lambda rng: sampling.generate(
    model, prompts, PROMPT_LENGTHS, rng=rng, max_new_tokens=T, num_samples=2, **SAMPLED
  )
  a, b, c = run(0), run(jax.random.key(0)), run(1)
  assert_generation_equal(a, b, atol=0)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_num_samples_layout(model):
  prompts = right_padded()
  run = functools.partial(sampling.generate, model, rng=2, max_new_tokens=T, **SAMPLED)
  out = run(prompts, PROMPT_LENGTHS, num_samples=2)
  np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(4), 2))
  assert out.tokens.shape == (8, T)
  assert_generation_equal(out, run(np.repeat(prompts, 2, 0), np.repeat(PROMPT_LENGTHS, 2)))
  tokens = np.asarray(out.tokens).reshape(4, 2, T)
  assert any(len({tuple(s) for s in samples}) > 1 for samples in tokens)  # samples differ


def test_compiled_program_is_reused(monkeypatch):
  chex.clear_trace_counter()
  counted = jax.jit(
    chex.assert_max_traces(sampling._generate_impl, n=1), static_argnames=('graphdef', 'settings')
  )
  monkeypatch.setattr(sampling, '_generate_jit', counted)
  models = [Transformer(CONFIG, rngs=nnx.Rngs(seed)) for seed in (4, 5)]
  prompts = right_padded()
  for seed, temperature, top_p in [(0, 1.0, 0.9), (1, 0.5, 0.7)]:  # new model, inputs, settings
    sampling.generate(
      models[seed],
      prompts + seed,
      np.roll(PROMPT_LENGTHS, seed),
      rng=seed,
      max_new_tokens=T,
      temperature=temperature,
      top_k=12,
      top_p=top_p,
      stop_tokens=(seed,),
      pad_id=seed,
      padding=('right', 'left')[seed],
      num_samples=2,
    )


def test_sharded_generation_equals_single_device(model):
  lengths = np.array([5, 2, 7, 3, 1, 6, 4, 7], np.int32)
  prompts = right_padded(lengths)
  single = sampling.generate(model, prompts, lengths, rng=4, max_new_tokens=T, **SAMPLED)
  mesh = parallel.make_mesh({'data': 8}, jax.devices()[:8])
  with parallel.axis_rules(mesh, parallel.DEFAULT_RULES):
    sharded = sampling.generate(model, prompts, lengths, rng=4, max_new_tokens=T, **SAMPLED)
  assert len(sharded.tokens.sharding.device_set) == 8
  assert_generation_equal(single, sharded)


def brute_force_logps(model, tokens, segment_ids=None, positions=None):
  logits = full_forward(model, tokens, segment_ids, positions)
  logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
  b, length = tokens.shape
  out = np.zeros((b, length))
  for i in range(b):
    for t in range(length - 1):
      out[i, t] = logp[i, t, tokens[i, t + 1]]
  return out


def test_score_equals_brute_force_with_packing_and_mask(model):
  shape = (8, 13)  # the shape of the other brute-force references: one compiled forward
  tokens = np.random.default_rng(2).integers(0, VOCAB, shape).astype(np.int32)
  segments, positions = np.ones(shape, np.int32), np.tile(np.arange(13, dtype=np.int32), (8, 1))
  segments[1, 4:], positions[1, 4:] = 2, np.arange(9)  # two packed documents
  segments[2, 6:], positions[2, 6:] = 0, 0  # padding
  mask = np.random.default_rng(3).random(shape) < 0.7
  mask[1, 3] = mask[2, 5:] = False  # no prediction across documents or into padding
  token_logps, seq_logps = jit_score(
    'score', model, tokens, loss_mask=mask, segment_ids=segments, positions=positions
  )
  want = brute_force_logps(model, tokens, segments, positions) * mask
  want[:, -1] = 0.0
  np.testing.assert_allclose(token_logps, want, atol=1e-5)
  np.testing.assert_allclose(seq_logps, want.sum(1), atol=1e-4)


@pytest.mark.parametrize('padding', ['right', 'left'])
def test_score_completions_equals_brute_force_and_generation(model, padding):
  prompts = right_padded()
  gen = sampling.generate(
    model, prompts, PROMPT_LENGTHS, rng=7, max_new_tokens=T, num_samples=2, **SAMPLED
  )
  comp, comp_lengths = np.asarray(gen.tokens), np.asarray(gen.lengths).copy()
  comp_lengths[1] = 0  # an empty completion scores 0
  comp_lengths[2] = 2
  p_lengths = PROMPT_LENGTHS[gen.prompt_index]
  given = prompts[gen.prompt_index]
  if padding == 'left':
    given = to_left(given, p_lengths)
  per_token, total = jit_score(
    'score_completions', model, given, p_lengths, comp, comp_lengths, padding=padding
  )
  seqs = np.zeros((len(comp), prompts.shape[1] + T), np.int32)  # unpadded prefix + anything
  for r, (n, c) in enumerate(zip(p_lengths, comp_lengths)):
    seqs[r, : n + c] = np.concatenate([prompts[gen.prompt_index[r], :n], comp[r, :c]])
  full = brute_force_logps(model, seqs)
  want = np.zeros((len(comp), T))
  for r, (n, c) in enumerate(zip(p_lengths, comp_lengths)):
    want[r, :c] = full[r, n - 1 : n + c - 1]
  np.testing.assert_allclose(per_token, want, atol=1e-5)
  np.testing.assert_allclose(total, want.sum(1), atol=1e-4)
  same = np.asarray(gen.lengths) == comp_lengths
  np.testing.assert_allclose(np.asarray(per_token)[same], np.asarray(gen.logprobs)[same], atol=1e-5)


def test_score_completion_lists_matches_full_forward(model):
  """Ragged pairs in length-sorted padded batches (two widths, a padded last batch) score as one
  unpadded-prefix forward pass each (causal, so trailing filler never matters)."""
  rng = np.random.default_rng(0)
  prompts = [np.r_[1, rng.integers(3, VOCAB, n)].astype(np.int32) for n in (5, 70, 12)]
  completions = [rng.integers(3, VOCAB, n).astype(np.int32) for n in (4, 9, 0)]
  got = sampling.score_completion_lists(model, prompts, completions, batch_size=2)
  seqs = np.zeros((3, 96), np.int32)
  for r, (p, c) in enumerate(zip(prompts, completions)):
    seqs[r, : len(p) + len(c)] = np.r_[p, c]
  full = brute_force_logps(model, seqs)
  for r, (p, c) in enumerate(zip(prompts, completions)):
    assert got[r].dtype == np.float32 and got[r].shape == (len(c),)
    np.testing.assert_allclose(got[r], full[r, len(p) - 1 : len(p) + len(c) - 1], atol=2e-5)
  batches = list(sampling.completion_batches(prompts, completions, 2))
  assert [b[0].tolist() for b in batches] == [[0, 2], [1]]
  assert [(b[1].shape, b[3].shape) for b in batches] == [((2, 64), (2, 64)), ((2, 128), (2, 64))]
  np.testing.assert_array_equal(batches[1][2], [71, 1])  # a lone pad token ...
  np.testing.assert_array_equal(batches[1][4], [9, 0])  # ... with an empty completion
  with pytest.raises(ValueError, match='2 prompts but 3 completions'):
    sampling.score_completion_lists(model, prompts[:2], completions, batch_size=2)


def test_score_gradients_match_brute_force(model):
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 6)), jnp.int32)
  mask = jnp.ones((2, 6), bool)
  graphdef, state = nnx.split(model)

  def via_score(state):
    return sampling.score(nnx.merge(graphdef, state), tokens, loss_mask=mask)[1].sum()

  def brute(state):
    logits, _ = nnx.merge(graphdef, state)(tokens)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], -1).sum()

  got, want = jax.jit(lambda s: (jax.grad(via_score)(s), jax.grad(brute)(s)))(state)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-5), got, want)


@pytest.mark.parametrize(
  'overrides,message',
  [
    (dict(prompt_lengths=[3, 8]), 'prompt_lengths must lie in'),
    (dict(prompt_lengths=[0, 2]), 'prompt_lengths must lie in'),
    (dict(prompt_lengths=[1, 2, 3]), 'prompt_lengths must have shape'),
    (dict(max_new_tokens=0), 'max_new_tokens'),
    (dict(max_new_tokens=5, max_length=10), 'exceeds max_length'),
    (dict(temperature=-0.1), 'temperature'),
    (dict(top_p=0.0), 'top_p'),
    (dict(top_p=1.5), 'top_p'),
    (dict(top_k=0), 'top_k'),
    (dict(num_samples=0), 'num_samples'),
    (dict(stop_tokens=(VOCAB,)), 'stop_tokens'),
    (dict(padding='middle'), 'padding'),
    (dict(rng=None), 'rng'),
    (dict(prompts=np.zeros((2,), np.int32)), 'prompts must be'),
  ],
)
def test_generate_bad_input(model, overrides, message):
  kwargs = dict(prompts=np.ones((2, 7), np.int32), prompt_lengths=[3, 7], rng=0, max_new_tokens=2)
  kwargs.update(overrides)
  with pytest.raises(ValueError, match=message):
    sampling.generate(model, **kwargs)


def test_score_bad_input(model):
  tokens = np.ones((2, 5), np.int32)
  with pytest.raises(ValueError, match='loss_mask shape'):
    sampling.score(model, tokens, loss_mask=np.ones((2, 4)))
  with pytest.raises(ValueError, match='temperature'):
    sampling.score(model, tokens, loss_mask=np.ones((2, 5)), temperature=0.0)
  with pytest.raises(ValueError, match='completion_lengths must lie in'):
    sampling.score_completions(model, tokens, [2, 5], tokens[:, :3], [1, 4])
  with pytest.raises(ValueError, match='share B'):
    sampling.score_completions(model, tokens, [2, 5], tokens[:1], [1])
