"""SPPD's step pairs and its loss on a hand-made tree: sibling steps ranked by value, and the sppd
method's loss against an independent re-implementation of the formula."""

import jax
import numpy as np
import pytest
from flax import nnx

from kuaijax.data import sequences, tasks
from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.jit_cache import split_params
from kuaijax.methods import MethodContext, get_method
from kuaijax.models.transformer import Transformer, TransformerConfig
from kuaijax.stages import sppd as sppd_stages

TOK = ByteTokenizer()
CONFIG = TransformerConfig(
  vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32,
  init_std=0.2,
)  # fmt: skip


def test_step_pairs_rank_siblings_and_keep_the_margin():
  node = lambda index, parent, step, value, correct: {
    'index': index, 'parent': parent, 'prompt': 'p', 'depth': 1, 'prefix_tokens': [7],
    'step_tokens': step, 'mc_value': value, 'step_correct': correct,
  }  # fmt: skip
  nodes = [
    node(0, 1, [5], 0.25, False),
    node(0, 1, [6], 1.0, True),
    node(0, 1, [6], 1.0, True),  # the same step again: counted once
    node(0, 1, [8], 0.5, True),
    node(0, 2, [5], 0.5, True),
    node(0, 2, [6], 0.25, False),  # gap 0.25: no pair
    node(1, 1, [5], 0.0, True),
    node(1, 1, [6], 1.0, False),  # program check says the other way round
  ]
  pairs, stats = sppd_stages.step_pairs(nodes, value='mc_value', min_gap=0.5)
  assert [(p['index'], p['chosen_tokens'], p['rejected_tokens']) for p in pairs] == [
    (0, [6], [5]),
    (1, [6], [5]),
  ]
  assert pairs[0]['chosen_value'] == 1.0 and pairs[0]['rejected_value'] == 0.25
  assert pairs[0]['prefix_tokens'] == [7]
  assert stats['pairs'] == 2 and stats['true_order'] == 0.5 and stats['inverted'] == 0.5
  two, _ = sppd_stages.step_pairs(nodes, value='mc_value', min_gap=0.0, max_pairs_per_parent=2)
  assert len(two) == 3  # three distinct siblings make one pair; one each for (0, 2) and (1, 1)
  # the values as a PRM's: it ranks parent (0, 1) as MC does, parent (1, 1) the other way round
  prm = [{**n, 'prm_value': v} for n, v in zip(nodes, [0.2, 0.6, 0.6, 0.3, 0.4, 0.4, 0.7, 0.1])]
  order = sppd_stages.sibling_order(prm, reference='mc_value', value='prm_value', min_gap=0.5)
  assert order == 0.5
  with pytest.raises(ValueError, match='max_pairs_per_parent'):
    sppd_stages.step_pairs(nodes, value='mc_value', min_gap=0.5, max_pairs_per_parent=0)


def step_logp(model, prompt, prefix, step) -> float:
  """log p(step | [bos] prompt prefix) from one full forward, summed over the step's tokens."""
  context = np.concatenate([[TOK.bos_id], TOK.encode(prompt), prefix]).astype(np.int32)
  tokens = np.concatenate([context, step]).astype(np.int32)
  logits = np.asarray(model(tokens[None])[0][0], np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  positions = np.arange(len(context) - 1, len(tokens) - 1)
  return float(logp[positions, tokens[positions + 1]].sum())


@pytest.mark.parametrize('gamma', [0.0, 2.0])
def test_sppd_loss_on_a_hand_made_tree_matches_the_formula(gamma):
  prompt = 'Question: 2*3+1?\nSolution:\n'
  enc = TOK.encode_array
  first = dict(index=0, parent=-1, prompt=prompt, depth=1, prefix_tokens=enc(''))
  second = dict(index=0, parent=0, prompt=prompt, depth=2, prefix_tokens=enc('[1] 2*3=6\n'))
  nodes = [  # the root's steps and, after the right first step, its two continuations
    {**first, 'step_tokens': enc('[1] 2*3=6\n'), 'mc_value': 0.9, 'step_correct': True},
    {**first, 'step_tokens': enc('[1] 2*3=5\n'), 'mc_value': 0.1, 'step_correct': False},
    {**second, 'step_tokens': enc('[2] 6+1=7\n'), 'mc_value': 1.0, 'step_correct': True},
    {**second, 'step_tokens': enc('[2] 6+1=8\n'), 'mc_value': 0.0, 'step_correct': False},
  ]
  pairs, stats = sppd_stages.step_pairs(nodes, value='mc_value', min_gap=0.5)
  assert stats['pairs'] == 2 and stats['true_order'] == 1.0
  policy = Transformer(CONFIG, rngs=nnx.Rngs(0))
  reference = Transformer(CONFIG, rngs=nnx.Rngs(1))
  ctx = MethodContext(TOK, tasks.get_task('kj_arith'), seq_len=96, prompt_len=64, max_new_tokens=32)
  method = get_method('sppd')(ctx, loss=dict(beta=0.5, gamma=gamma))
  examples, _ = method.examples(pairs)
  examples = method.prepare(examples, *split_params(reference))
  loss, metrics = method.loss_fn(policy, sequences.stack(examples), jax.random.key(0))
  expected = []
  for p in pairs:
    h = sum(
      sign * (step_logp(policy, prompt, p['prefix_tokens'], p[side])
              - step_logp(reference, prompt, p['prefix_tokens'], p[side]))
      for sign, side in ((1, 'chosen_tokens'), (-1, 'rejected_tokens'))
    )  # fmt: skip
    margin = gamma * (p['chosen_value'] - p['rejected_value'])
    expected.append(np.log1p(np.exp(-(0.5 * h - margin))))  # -log sigmoid(beta h - margin)
  np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(metrics['value_margin']), 0.9, atol=1e-6)
