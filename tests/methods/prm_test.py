"""The process reward model: its rows and loss against full forwards, step scoring, the GRPO token
rewards and the best-of-n reranker built on it."""

import jax
import numpy as np
import pytest
from flax import nnx

from kuaijax import sampling
from kuaijax.data import sequences, tasks
from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.jit_cache import split_params
from kuaijax.losses import rl
from kuaijax.methods import MethodContext, get_method, prm
from kuaijax.models.transformer import Transformer, TransformerConfig

TOK = ByteTokenizer()
CONFIG = TransformerConfig(
  vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32,
  init_std=0.2,
)  # fmt: skip
CTX = MethodContext(TOK, tasks.get_task('kj_arith'), seq_len=64, prompt_len=32, max_new_tokens=32)
PLUS, MINUS = TOK.encode('+')[0], TOK.encode('-')[0]


def judge(model, tokens, position) -> float:
  """logit('+') - logit('-') after tokens[:position + 1], from a full forward without padding."""
  logits = np.asarray(model(np.asarray(tokens[: position + 1])[None])[0][0, -1])
  return float(logits[PLUS] - logits[MINUS])


def records():
  step = lambda text: TOK.encode_array(text)
  return [
    {'prompt': 'Q: 1+1?\n', 'prefix_tokens': step(''), 'step_tokens': step('[1] 1+1=2\n'),
     'mc_value': 1.0},
    {'prompt': 'Q: 2*3?\n', 'prefix_tokens': step('[1] 2*3=6\n'), 'step_tokens': step('The'),
     'mc_value': 0.25},
  ]  # fmt: skip


def test_rows_and_loss_match_full_forwards():
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  method = get_method('prm')(CTX)
  examples, stats = method.examples(records())
  assert stats == {'examples': 2, 'too_long': 0, 'label_mean': 0.625}
  expected = []
  for e, r in zip(examples, records()):
    tokens = np.concatenate(
      [sequences.prompt_ids(TOK, r['prompt']), r['prefix_tokens'], r['step_tokens']]
    )
    np.testing.assert_array_equal(e['tokens'][: len(tokens)], tokens)
    assert e['position'] == len(tokens) - 1 and e['segment_ids'].sum() == len(tokens)
    z, y = judge(model, tokens, len(tokens) - 1), r['mc_value']
    expected.append(-(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 / (1 + np.exp(z)))))
  loss, metrics = method.loss_fn(model, sequences.stack(examples), jax.random.key(0))
  np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-4)
  assert 0 <= float(metrics['accuracy']) <= 1
  with pytest.raises(ValueError, match='mc_value'):
    method.examples([{**records()[0], 'mc_value': 1.5}])


def test_score_steps_reads_every_step_end_in_one_forward():
  model = Transformer(CONFIG, rngs=nnx.Rngs(1))
  prompts = [sequences.prompt_ids(TOK, 'Q: 1+1?\n'), sequences.prompt_ids(TOK, 'Q: 5-2?\n')]
  completions = [TOK.encode_array('[1] 1+1=2\nThe answer is 2'), TOK.encode_array('no steps')]
  ends = [prm.step_ends(c, TOK.encode('\n')) for c in completions]
  np.testing.assert_array_equal(ends[0], [9, 24])
  np.testing.assert_array_equal(ends[1], [7])
  scores = prm.score_steps(*split_params(model), TOK, prompts, completions, ends, batch_size=4)
  for p, c, e, s in zip(prompts, completions, ends, scores):
    tokens = np.concatenate([p, c])
    z = np.array([judge(model, tokens, len(p) + k) for k in e])
    np.testing.assert_allclose(s, 1 / (1 + np.exp(-z)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    prm.solution_scores(scores + [np.zeros(0)]), [scores[0].min(), scores[1][0], 0]
  )


def test_step_token_rewards_feed_grpo_and_best_of_n_reranks():
  rewards, mask = prm.step_token_rewards(
    [np.array([0.9, 0.2]), np.array([0.6])], [np.array([1, 4]), np.array([2])], width=6
  )
  np.testing.assert_allclose(rewards, [[0, 0.9, 0, 0, 0.2, 0], [0, 0, 0.6, 0, 0, 0]])
  assert mask.sum() == 3 and mask[0, 4] and mask[1, 2]
  advantages, keep, _ = rl.grpo_process_rewards(rewards, 2, mask=mask)
  assert advantages.shape == (2, 6) and float(np.abs(np.asarray(advantages)[~mask]).max()) == 0
  with pytest.raises(ValueError, match='width'):
    prm.step_token_rewards([np.array([0.5])], [np.array([6])], width=6)
  samples = [sampling.Sample(i // 3, np.zeros(0), np.zeros(0), str(i)) for i in range(6)]
  best = sampling.best_of_n(samples, [0.1, 0.7, 0.7, 0.3, 0.2, 0.1])
  assert [s.text for s in best] == ['1', '3']
