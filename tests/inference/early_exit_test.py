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


def reference_decode(model, tokens, rule, threshold):
  """Early-exit greedy decoding of ONE prompt with no cache: every step recomputes the whole
  sequence layer by layer, freezing each earlier position's residual state after the layer at
  which its own step exited (prompt positions: full depth)."""
  tokens, used = list(tokens), [LAYERS] * len(tokens)
  new, new_used = [], []
  for step in range(T):
    seq = jnp.asarray(tokens)[None]
    pos = jnp.arange(len(tokens))[None]
    seg = jnp.ones_like(seq)
    x = model.embed(seq)
    exit_at, prev = None, None
    for j, block in enumerate(model.layers):
      y = block(x, pos, seg)[0]
      frozen = jnp.asarray(used)[None, :, None] <= j
      if step > 0 and exit_at is not None:
        frozen = frozen.at[0, -1].set(True)
      x = jnp.where(frozen, x, y)
      if step == 0 or exit_at is not None:
        continue
      logits = early_exit.readout(model, x[0, -1])
      p = jax.nn.softmax(logits)
      arg = int(jnp.argmax(logits))
      ok = float(p.max()) >= threshold if rule == 'confidence' else arg == prev
      if ok or j == LAYERS - 1:
        exit_at, token = j + 1, arg
      prev = arg
    if step == 0:  # the first token comes from the full-depth prompt pass
      exit_at, token = LAYERS, int(jnp.argmax(early_exit.readout(model, x[0, -1])))
    used[-1] = exit_at  # the input position of this step keeps its exit layer
    new.append(token)
    new_used.append(exit_at)
    tokens.append(token)
    used.append(LAYERS)  # decided in the next step
  return new, new_used


@pytest.mark.parametrize('rule, threshold', [('confidence', 0.4), ('agreement', 1.0)])
def test_exits_and_kv_propagation_match_cache_free_reference(model, rule, threshold):
  p = prompts()
  out = early_exit.early_exit_generate(
    model, p, LENGTHS, max_new_tokens=T, rule=rule, threshold=threshold
  )
  used = np.asarray(out.layers_used)
  assert (used < LAYERS).any() and (used[:, 1:] == LAYERS).any(), used  # the test exercises both
  for row in (0, 2):  # two of the three rows keep the eager reference cheap
    tokens, layers = reference_decode(model, p[row, : LENGTHS[row]], rule, threshold)
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
