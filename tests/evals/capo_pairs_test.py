"""kj_dialog_pairs: preference and implicit-reward accuracy on held-out CaPO pairs."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from kuaijax.config_lib import load_config
from kuaijax.data import chat, dialog, tasks, tokenizers
from kuaijax.evals import capo_pairs, registry
from kuaijax.jit_cache import split_params
from kuaijax.models.transformer import Transformer, TransformerConfig
from tests.conftest import REPO_ROOT

TOK = tokenizers.ByteTokenizer()
SEQ_LEN = 128
BETA = 0.1


def _messages(*turns):
  roles = ('user', 'assistant')
  return [{'role': roles[i % 2], 'content': text} for i, text in enumerate(turns)]


# Hand-made pairs: two neglect pairs (per-kind means over more than one pair), one of each other.
PAIRS = [
  {
    'messages': _messages('Sort 3 1 2.', '1 2 3', 'Append 4 to it.'),
    'chosen': '1 2 3 4',
    'rejected': '4',
    'negative': 'neglect',
  },
  {
    'messages': _messages('Reverse 5 6.', '6 5', 'Sort 9 7.', '7 9', 'What was the first answer?'),
    'chosen': '6 5',
    'rejected': 'empty',
    'negative': 'neglect',
  },
  {
    'messages': _messages('Sort 3 1 2.', '1 2 3', 'Append 4 to it.'),
    'chosen': '1 2 3 4',
    'rejected': '8 0 4',
    'negative': 'hallucination',
  },
  {
    'messages': _messages('Reverse 5 6.', '6 5', 'Sort 9 7.', '7 9', 'Same for the first answer.'),
    'chosen': '5 6',
    'rejected': '9 7',
    'negative': 'misunderstanding',
  },
]


def _model(seed):
  config = TransformerConfig(
    vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, d_ff=32, init_std=0.5
  )
  return Transformer(config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope='module')
def models():
  return _model(0), _model(1)  # policy, reference


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


def _direct_logp(model, messages, answer):
  """log p(answer | conversation) by one full forward pass: log-softmax gathered at the answer's
  tokens (the conversation in the chat layout, then `answer content + turn ending + eos`)."""
  prompt = chat.encode_prompt(messages, TOK, next_role='assistant', max_len=10**6)[0]
  ids = np.concatenate([prompt, chat.answer_ids(TOK, answer)])
  logps = np.asarray(jax.nn.log_softmax(_logits(model, ids[None].astype(np.int32))[0], -1))
  return float(sum(logps[t - 1, ids[t]] for t in range(len(prompt), len(ids))))


def _evaluator(**options):
  return capo_pairs.PairsEvaluator(TOK, PAIRS, seq_len=SEQ_LEN, batch_size=3, beta=BETA, **options)


def test_numbers_match_a_direct_forward_pass(models):
  policy, reference = models
  loads = []

  def load_model(path, role):
    loads.append((path, role))
    return split_params(reference)

  evaluator = _evaluator(reference='sft_long', load_model=load_model)
  with registry.stage_scope('capo_all', {'sft_long': ('/run/seed_0/sft_long', 'policy')}):
    out = evaluator(policy)
    again = evaluator(policy)
  assert out == again and loads == [('/run/seed_0/sft_long', 'policy')]  # reference scored once
  logp = lambda model, side: np.array([_direct_logp(model, p['messages'], p[side]) for p in PAIRS])
  pc, pr = logp(policy, 'chosen'), logp(policy, 'rejected')
  rc, rr = logp(reference, 'chosen'), logp(reference, 'rejected')
  margin = pc - pr
  reward = BETA * (pc - rc) - BETA * (pr - rr)
  assert np.abs(reward).min() > 1e-3 and np.abs(margin).min() > 1e-3  # no sign is a near tie
  kinds = np.array([p['negative'] for p in PAIRS])
  for kind in (*dialog.NEGATIVE_KINDS, 'all'):
    sel = np.ones(len(PAIRS), bool) if kind == 'all' else kinds == kind
    assert out[f'pairs/{kind}/count'] == sel.sum()
    assert out[f'pairs/{kind}/preference_accuracy'] == (margin[sel] > 0).mean()
    assert out[f'pairs/{kind}/reward_accuracy'] == (reward[sel] > 0).mean()
    assert out[f'pairs/{kind}/margin'] == pytest.approx(margin[sel].mean(), rel=1e-4, abs=1e-4)
    assert out[f'pairs/{kind}/reward_margin'] == pytest.approx(
      reward[sel].mean(), rel=1e-4, abs=1e-5
    )
  assert out['pairs/too_long'] == 0 and out['pairs/truncated_from_oldest'] == 0


def test_the_policy_as_its_own_reference_gives_zero_rewards(models):
  policy, _ = models
  evaluator = _evaluator(reference='sft_long', load_model=lambda path, role: split_params(policy))
  with registry.stage_scope('sft_long', {}):  # the reference stage evaluating itself
    itself = evaluator(policy)
  with registry.stage_scope('capo_all', {'sft_long': ('/ckpt', 'policy')}):  # a copy, loaded
    loaded = evaluator(policy)
  for out in (itself, loaded):
    for kind in (*dialog.NEGATIVE_KINDS, 'all'):
      assert out[f'pairs/{kind}/reward_accuracy'] == 0.0
      assert out[f'pairs/{kind}/reward_margin'] == 0.0
      assert out[f'pairs/{kind}/preference_accuracy'] == itself[f'pairs/{kind}/preference_accuracy']
  # No reference available (outside a pipeline, or none configured): preference metrics only.
  for out in (evaluator(policy), _evaluator()(policy)):
    assert 'pairs/all/preference_accuracy' in out and 'pairs/all/margin' in out
    assert not any('reward' in key for key in out)


def test_pair_metrics_and_options():
  out = capo_pairs.pair_metrics(
    ['neglect', 'neglect', 'hallucination'],
    [-1.0, -2.0, -3.0],
    [-2.0, -1.0, -3.0],
    [-1.5, -2.0, -3.0],
    [-2.0, -2.0, -4.0],
    beta=0.5,
  )
  assert out['pairs/neglect/preference_accuracy'] == 0.5 and out['pairs/neglect/margin'] == 0.0
  assert out['pairs/hallucination/preference_accuracy'] == 0.0  # a tie is not a win
  # rewards: 0.5 * (0.5 - 0) = 0.25, 0.5 * (0 - 1) = -0.5, 0.5 * (0 - 1) = -0.5
  assert (
    out['pairs/neglect/reward_accuracy'] == 0.5 and out['pairs/neglect/reward_margin'] == -0.125
  )
  assert out['pairs/all/reward_accuracy'] == pytest.approx(1 / 3)
  assert out['pairs/misunderstanding/count'] == 0 and 'pairs/misunderstanding/margin' not in out
  with pytest.raises(ValueError, match='kinds'):
    _evaluator(kinds=('neglect', 'forgetting'))
  short = capo_pairs.PairsEvaluator(TOK, PAIRS, seq_len=60, beta=BETA)
  assert short.counts['pairs/truncated_from_oldest'] == 4 and len(short.examples) == 4
  with pytest.raises(ValueError, match='no pair'):
    capo_pairs.PairsEvaluator(TOK, PAIRS, seq_len=40)


def test_runlocal_pairs_are_held_out_from_training_sessions():
  config = load_config(os.path.join(REPO_ROOT, 'configs/capo/parrot.py') + ':runlocal')
  ev = config.evals.kj_dialog_pairs
  assert ev.reference == 'sft_long' and ev.split != 'train' and ev.beta == 0.1
  ctx = registry.EvalContext(tokenizer=TOK, data=config.data)
  evaluator = registry.build_evaluators(config.evals, ctx).evaluators['kj_dialog_pairs']
  assert isinstance(evaluator, capo_pairs.PairsEvaluator)
  assert set(evaluator.negative) == set(dialog.NEGATIVE_KINDS)
  held_out = tasks.load_dialog_sessions(ev.split, limit=ev.sessions)
  train = tasks.load_dialog_sessions('train')
  train_prefixes = {tuple(t.user for t in s[:k]) for s in train for k in range(1, len(s) + 1)}
  assert len(train) == dialog.DEFAULT_SPLIT_SIZES['train']
  pairs = capo_pairs.session_pairs(held_out)
  assert len(pairs) == len(evaluator.examples) + evaluator.counts['pairs/too_long']
  for pair in pairs:  # no pair's history + query is the beginning of any training session
    users = tuple(m['content'] for m in pair['messages'] if m['role'] == 'user')
    assert users not in train_prefixes
    assert held_out[pair['session']][len(users) - 1].user == users[-1]
  assert not {tuple(t.user for t in s) for s in held_out} & {
    tuple(t.user for t in s) for s in train
  }
  with pytest.raises(ValueError, match='held-out'):
    capo_pairs.build(dict(split='train', sessions=2), ctx)
