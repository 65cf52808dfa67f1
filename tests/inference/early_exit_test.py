"""Early exit: threshold 1.0 = normal greedy decoding, exits and KV propagation against a cache-free
re-implementation, per-layer read-outs, the gate, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax import sampling
from kuaijax.inference import early_exit
from kuaijax.models.transformer import Transformer, TransformerConfig

VOCAB, LAYERS, T = 23, 4, 6
CONFIG = TransformerConfig(
  vocab_size=VOCAB,
  d_model=16,
  num_layers=LAYERS,
  num_heads=2,
  num_kv_heads=1,
  d_ff=32,
  init_std=0.6,
)
LENGTHS = np.array([5, 2, 4], np.int32)


_GRAPHDEF = nnx.graphdef(Transformer(CONFIG, rngs=nnx.Rngs(3)))


@pytest.fixture(scope='module')
def model():
  return Transformer(CONFIG, rngs=nnx.Rngs(3))


def prompts(width=5):
  rng = np.random.default_rng(0)
  out = np.zeros((len(LENGTHS), width), np.int32)
  for i, n in enumerate(LENGTHS):
    out[i, :n] = rng.integers(3, VOCAB, n)
  return out


def test_threshold_one_is_normal_greedy_decoding(model):
  p = prompts()
  ref = sampling.generate(model, p, LENGTHS, max_new_tokens=T, greedy=True, stop_tokens=(5,))
  out = early_exit.early_exit_generate(
    model, p, LENGTHS, max_new_tokens=T, threshold=1.0, stop_tokens=(5,)
  )
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  np.testing.assert_array_equal(out.stopped, ref.stopped)
  used = np.asarray(out.layers_used)
  assert (used[np.arange(T)[None] < np.asarray(out.lengths)[:, None]] == LAYERS).all()


@jax.jit
def _reference_logits(state, tokens, used, n):
  """Per-layer logits [L, V] at position n - 1 of a cache-free pass over the padded sequence
  `tokens` [S]: every layer runs on the whole prefix, and position p keeps its residual state after
  its exit layer used[p] (slots >= n are padding, segment 0)."""
  model = nnx.merge(_GRAPHDEF, state)
  slots = jnp.arange(tokens.shape[0])
  seg = (slots < n).astype(jnp.int32)[None]
  x = model.embed(tokens[None])
  out = []
  for j, block in enumerate(model.layers):
    y = block(x, slots[None], seg)[0]
    x = jnp.where((used <= j)[None, :, None], x, y)
    out.append(early_exit.readout(model, x[0, n - 1]))
  return jnp.stack(out)


def reference_decode(model, prompt, rule, threshold):
  """Early-exit greedy decoding of ONE prompt with no cache: each step recomputes the whole
  sequence, freezing each earlier position's residual state after the layer at which its own step
  exited (prompt positions: full depth). The newest position runs every layer; only its logits up
  to the exit layer are read, and nothing earlier depends on its later states."""
  state = nnx.state(model)
  size = max(LENGTHS) + T  # one shape for every prompt: one compiled reference
  tokens = np.zeros(size, np.int32)
  tokens[: len(prompt)] = prompt
  used = np.full(size, LAYERS, np.int32)
  new, new_used = [], []
  for step in range(T):
    n = len(prompt) + step
    logits = np.asarray(_reference_logits(state, tokens, used, n))
    exit_at = LAYERS
    if step > 0:  # the first token comes from the full-depth prompt pass
      for j in range(LAYERS):
        p = np.exp(logits[j] - logits[j].max())
        p /= p.sum()
        accept = (
          p.max() >= threshold
          if rule == 'confidence'
          else j > 0 and logits[j].argmax() == logits[j - 1].argmax()
        )
        if accept:
          exit_at = j + 1
          break
    used[n - 1] = exit_at
    tokens[n] = logits[exit_at - 1].argmax()
    new.append(int(tokens[n]))
    new_used.append(exit_at)
  return new, new_used


@pytest.mark.parametrize('rule, threshold', [('confidence', 0.4), ('agreement', 1.0)])
def test_exits_and_kv_propagation_match_cache_free_reference(model, rule, threshold):
  p = prompts()
  out = early_exit.early_exit_generate(
    model, p, LENGTHS, max_new_tokens=T, rule=rule, threshold=threshold
  )
  used = np.asarray(out.layers_used)
  assert (used < LAYERS).any() and (used[:, 1:] == LAYERS).any(), used  # the test exercises both
  for row, n in enumerate(LENGTHS):
    tokens, layers = reference_decode(model, p[row, :n], rule, threshold)
    assert np.asarray(out.tokens[row]).tolist() == tokens, row
    assert used[row].tolist() == layers, row


def test_layer_logits_and_analysis(model):
  tokens = prompts(5)
  logits = early_exit.layer_logits(model, tokens)
  assert logits.shape == (LAYERS, 3, 5, VOCAB)
  np.testing.assert_allclose(logits[-1], model(jnp.asarray(tokens))[0], rtol=1e-5, atol=1e-5)
  targets = np.roll(tokens, -1, axis=1)
  mask = np.ones(tokens.shape, np.float32)
  stats = early_exit.layer_analysis(
    model, [{'inputs': tokens, 'targets': targets, 'loss_mask': mask}]
  )
  assert stats['agreement'][-1] == 1.0 and stats['tokens'] == 15
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[1]), targets[..., None], axis=-1)
  assert stats['loss'][1] == pytest.approx(float(nll.mean()), rel=1e-5)


def test_exit_layers_teacher_forced():
  # Layer logits [L=3, N=3, V=2]: token 0 confident at layer 1, token 1 at layer 2, token 2 never.
  logits = jnp.log(
    jnp.asarray(
      [
        [[0.95, 0.05], [0.6, 0.4], [0.45, 0.55]],
        [[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]],
        [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]],
      ]
    )
  )
  assert early_exit.exit_layers(logits, threshold=0.85).tolist() == [1, 2, 3]
  assert early_exit.exit_layers(logits, threshold=0.85, min_layer=2).tolist() == [2, 2, 3]
  assert early_exit.exit_layers(logits, threshold=1.0).tolist() == [3, 3, 3]
  assert early_exit.exit_layers(logits, rule='agreement').tolist() == [2, 3, 3]


def test_gate_learns_which_layers_agree(model):
  logits = early_exit.layer_logits(model, prompts(5))
  gate = early_exit.fit_gate(logits, steps=200)
  feats = jnp.stack([early_exit.exit_features(logits[i], i, LAYERS) for i in range(LAYERS)])
  labels = np.asarray(jnp.argmax(logits, -1) == jnp.argmax(logits[-1], -1))
  predicted = np.asarray(gate(feats)) >= 0.5
  assert (predicted == labels).mean() >= max(labels.mean(), 1 - labels.mean())  # beats a constant
  out = early_exit.early_exit_generate(
    model, prompts(), LENGTHS, max_new_tokens=3, rule='gate', threshold=0.5, gate=gate
  )
  assert out.tokens.shape == (3, 3)


def test_bad_input(model):
  p = prompts()
  run = lambda **kw: early_exit.early_exit_generate(model, p, LENGTHS, max_new_tokens=2, **kw)
  for threshold in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match=r'threshold must be in \(0, 1\]'):
      run(threshold=threshold)
  with pytest.raises(ValueError, match='exit rule'):
    run(rule='entropy')
  with pytest.raises(ValueError, match='fitted gate'):
    run(rule='gate')
  with pytest.raises(ValueError, match='min_layer'):
    run(min_layer=LAYERS + 1)
  with pytest.raises(ValueError, match='shared final norm and LM head'):
    early_exit.layer_logits(object(), p)
  pc = Transformer(TransformerConfig(**{**CONFIG.__dict__, 'stack': 'pc_rk2'}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='vanilla'):
    early_exit.early_exit_generate(pc, p, LENGTHS, max_new_tokens=2)
