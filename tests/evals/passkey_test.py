"""Needle retrieval evaluator: document layout, masks, scoring against oracles, real-model run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax.data.tokenizers import get_tokenizer
from kuaijax.evals import passkey
from kuaijax.models.transformer import Transformer, TransformerConfig

TOK = get_tokenizer('byte')


@pytest.mark.parametrize('template', ['recall', 'passkey'])
def test_rows_are_right_aligned_documents_with_the_answer_masked(template):
  batch = passkey.retrieval_batch(TOK, 160, [0.0, 0.5, 1.0], 2, template=template, seed=3)
  assert batch['inputs'].shape == (6, 160)
  for i in range(6):
    seg = batch['segment_ids'][i]
    real = seg > 0
    first = int(np.argmax(real))
    assert real[first:].all() and not real[:first].any()  # padding only on the left
    np.testing.assert_array_equal(batch['positions'][i][first:], np.arange(160 - first))
    assert batch['inputs'][i][first] == TOK.bos_id
    # Targets are the inputs shifted by one inside the document.
    np.testing.assert_array_equal(batch['targets'][i][first:-1], batch['inputs'][i][first + 1 :])
    answer = TOK.decode(batch['targets'][i][batch['answer_mask'][i] > 0])
    prompt = TOK.decode(batch['inputs'][i][first + 1 :])
    assert answer.isdigit() and prompt.endswith(answer[:-1])
    if template == 'recall':
      body, query = prompt.rsplit('. query ', 1)
      pairs = body.removeprefix('recall: ').split(', ')
      key = query.split(' -> ')[0]
      index = [p.split('=')[0] for p in pairs].index(key)
      assert pairs[index] == f'{key}={answer}'
      assert index == round(batch['depth'][i] * (len(pairs) - 1))  # the needle sits at its depth
      assert first <= 12  # the haystack fills the context
    else:
      assert f'The pass key is {answer}. Remember it.' in prompt


def _oracle(batch, shift=0):
  """Logits that put all mass on the true next token (or on a wrong one with shift != 0)."""

  def model(inputs, positions, segment_ids):
    del positions, segment_ids
    rows = [np.flatnonzero((batch['inputs'] == np.asarray(r)).all(1))[0] for r in inputs]
    targets = (batch['targets'][rows] + shift) % TOK.vocab_size
    return jax.nn.one_hot(targets, TOK.vocab_size) * 50.0, {}

  return model


def test_scores_against_oracles_and_uniform_logits():
  depths = (0.0, 1.0)
  batch = passkey.retrieval_batch(TOK, 96, depths, 3, seed=0)
  right = passkey.evaluate_retrieval(_oracle(batch), TOK, [96], depths=depths, per_depth=3)
  assert right[96]['accuracy'] == 1.0 and right[96]['answer_loss'] < 1e-6
  assert right[96]['examples'] == 6 and right[96]['accuracy_by_depth'] == {0.0: 1.0, 1.0: 1.0}
  wrong = passkey.evaluate_retrieval(_oracle(batch, 1), TOK, [96], depths=depths, per_depth=3)
  assert wrong[96]['accuracy'] == 0.0
  retrieved, loss = passkey.score_retrieval(
    jnp.zeros((6, 96, TOK.vocab_size)), batch['targets'], batch['answer_mask']
  )
  assert not retrieved.any()
  np.testing.assert_allclose(loss, math.log(TOK.vocab_size), rtol=1e-6)


def test_a_real_model_is_scored_beyond_its_length():
  cfg = TransformerConfig(vocab_size=384, d_model=16, num_layers=1, num_heads=2, d_ff=32)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  out = passkey.evaluate_retrieval(model, TOK, [48, 200], depths=(0.5,), per_depth=2, batch_size=1)
  for length in (48, 200):
    # Against the same examples scored by hand: one forward pass of the whole batch, float64.
    batch = passkey.retrieval_batch(TOK, length, (0.5,), 2, seed=0)
    logits, _ = model(
      jnp.asarray(batch['inputs']),
      positions=jnp.asarray(batch['positions']),
      segment_ids=jnp.asarray(batch['segment_ids']),
    )
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    mask = batch['answer_mask'] > 0
    nll = -np.take_along_axis(logp, batch['targets'][..., None], axis=-1)[..., 0]
    right = (logits.argmax(-1) == batch['targets']) | ~mask
    assert out[length]['examples'] == 2 and mask.sum(-1).min() > 0
    assert out[length]['accuracy'] == right.all(-1).mean()
    expected_loss = ((nll * mask).sum(-1) / mask.sum(-1)).mean()
    assert out[length]['answer_loss'] == pytest.approx(expected_loss, rel=1e-5)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="template='haystack' is not one of"):
    passkey.retrieval_batch(TOK, 64, [0.5], 1, template='haystack')
  with pytest.raises(ValueError, match='depths must lie in'):
    passkey.retrieval_batch(TOK, 64, [1.5], 1)
  with pytest.raises(ValueError, match='too short'):
    passkey.retrieval_batch(TOK, 20, [0.5], 1, template='passkey')
