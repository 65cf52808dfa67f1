import jax
import numpy as np
import pytest
from flax import nnx

from kuaijax.data import chat, dialog, tokenizers
from kuaijax.evals import judge, multi_turn
from kuaijax.models.transformer import Transformer, TransformerConfig

TOK = tokenizers.ByteTokenizer()
SESSIONS = [dialog.generate_session(2, i, num_turns=8) for i in range(40)]
# Kinds that read an earlier ANSWER (an ellipsis only reuses the earlier operation).
_READS_ANSWER = ('pronoun', 'ordinal', 'again', 'ellipsis_ordinal', 'recall')


def _program(conversation):
  """Answers the last user turn from the history AS SHOWN (displayed answers, not gold ones)."""
  history = dialog.History()
  for user, shown in zip(conversation[:-1:2], conversation[1::2], strict=True):
    try:
      answer = dialog.parse_list(shown['content'])
    except dialog.InvalidQuery:
      answer = ()
    history.add(dialog.parse_query(user['content']), answer)
  query = dialog.parse_query(conversation[-1]['content'])
  return dialog.format_list(dialog.answer_query(query, history))


def _wrong_first_turn(conversations):
  return ['0 0 0 0 0 0 0' if len(c) == 1 else _program(c) for c in conversations]


def test_own_and_gold_history():
  perfect = multi_turn.score_answers(
    SESSIONS, multi_turn.answer_sessions(lambda cs: [_program(c) for c in cs], SESSIONS)
  )
  assert perfect['accuracy'] == 1.0 and perfect['turns'] == 8 * len(SESSIONS)
  assert perfect['count/context_dependent'] == sum(t.context_dependent for s in SESSIONS for t in s)
  gold = multi_turn.answer_sessions(_wrong_first_turn, SESSIONS, history='gold')
  own = multi_turn.answer_sessions(_wrong_first_turn, SESSIONS, history='own')
  scores = multi_turn.score_answers(SESSIONS, gold)
  assert scores['accuracy/turn_1'] == 0.0
  assert all(scores[f'accuracy/turn_{k}'] == 1.0 for k in range(2, 9))
  checked = 0
  for session, gold_replies, own_replies in zip(SESSIONS, gold, own, strict=True):
    for k, turn in enumerate(session[1:], 2):
      assert gold_replies[k - 1] == turn.assistant
      if turn.kind in _READS_ANSWER and 1 in turn.depends_on:
        assert own_replies[k - 1] != turn.assistant  # the wrong first answer propagates
        checked += 1
      if not turn.context_dependent:
        assert own_replies[k - 1] == turn.assistant
  assert checked >= 3
  with pytest.raises(ValueError, match='history'):
    multi_turn.answer_sessions(_wrong_first_turn, SESSIONS, history='mine')


@pytest.fixture(scope='module')
def model():
  config = TransformerConfig(
    vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, d_ff=32, init_std=0.5
  )
  return Transformer(config, rngs=nnx.Rngs(0))


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


def _greedy_reference(model, ids, steps, width=64):
  """Greedy continuation by full causal forward passes (no KV cache), stopping at eos."""
  ids, out = list(ids), []
  for _ in range(steps):
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(ids)] = ids  # Causal: the padding after position len - 1 changes nothing.
    token = int(np.argmax(np.asarray(_logits(model, padded))[0, len(ids) - 1]))
    out.append(token)
    if token == TOK.eos_id:
      break
    ids.append(token)
  return TOK.decode(out).strip()


def test_generate_turns_and_model_judge_against_full_forward(model):
  conversations = [
    [{'role': 'user', 'content': 'Sort 3 1.'}],
    chat.session_messages(['Sort 3 1.', 'Reverse it.'], ['1 3', '3 1'])[:3],
    [{'role': 'user', 'content': 'Reverse 2 8.'}],
  ]
  replies, truncated = multi_turn.generate_turns(
    model, TOK, conversations, max_prompt_len=40, max_new_tokens=6, batch_size=2
  )
  assert truncated == 1  # the second conversation loses its first exchange to fit 40 tokens
  for messages, reply in zip(conversations, replies, strict=True):
    ids, _ = chat.encode_prompt(messages, TOK, next_role='assistant', max_len=40)
    assert reply == _greedy_reference(model, ids, 6)
  with pytest.raises(ValueError, match='conversation 0'):
    multi_turn.generate_turns(model, TOK, conversations, max_prompt_len=10, max_new_tokens=2)
  # The judge sees (system, user) as a chat; these prompts reuse the compiled program above.
  prompts = [('Rate.', 'Sort 3 1 gave 1 3.'), ('Rate it.', 'Sort 2 1 3.')]
  model_judge = judge.ModelJudge(model, TOK, max_prompt_len=56, max_new_tokens=6, batch_size=2)
  for (system, user), reply in zip(prompts, model_judge(prompts), strict=True):
    messages = [{'role': 'system', 'content': system}, {'role': 'user', 'content': user}]
    ids, _ = chat.encode_prompt(messages, TOK, next_role='assistant', max_len=56)
    assert reply == _greedy_reference(model, ids, 6)
  assert judge.rate(model_judge, prompts) == ([None, None], 2)  # a random model writes no rating


def test_context_sensitivity_against_full_forward(model):
  sessions = [s[:3] for s in SESSIONS[:6]]
  seq_len = 128
  expected = []
  for session in sessions:
    messages = chat.session_messages([t.user for t in session], [t.assistant for t in session])
    for k, turn in enumerate(session):
      if not turn.context_dependent:
        continue
      gap = 0.0
      for sign, conv in ((1, messages[: 2 * k + 2]), (-1, messages[2 * k : 2 * k + 2])):
        prompt, _ = chat.encode_prompt(conv[:-1], TOK, next_role='assistant', max_len=seq_len)
        answer = TOK.encode(conv[-1]['content'] + '\n') + [TOK.eos_id]  # 'plain' layout
        ids = np.zeros((1, seq_len), np.int32)
        ids[0, : len(prompt) + len(answer)] = [*prompt, *answer]
        logp = np.asarray(jax.nn.log_softmax(_logits(model, ids)[0], axis=-1))
        positions = range(len(prompt) - 1, len(prompt) - 1 + len(answer))
        gap += sign * sum(logp[p, ids[0, p + 1]] for p in positions)
      expected.append(gap)
  got = multi_turn.context_sensitivity(model, TOK, sessions, seq_len=seq_len, batch_size=2)
  assert got['count/context_sensitivity'] == len(expected) > 0
  np.testing.assert_allclose(got['context_sensitivity'], np.mean(expected), rtol=1e-4, atol=1e-4)


def test_dialog_evaluator_runs(model):
  # Same shapes as the tests above, so no new program is compiled.
  evaluator = multi_turn.DialogEvaluator(
    TOK, SESSIONS[:2], num_turns=2, seq_len=128, max_new_tokens=6, batch_size=2
  )
  metrics = evaluator(model)
  assert metrics['turns'] == 4 and 0 <= metrics['accuracy'] <= 1
  assert {'accuracy/turn_1', 'accuracy/turn_2', 'truncated_prompts'} <= set(metrics)
  with pytest.raises(ValueError, match='>= 9 turns'):
    multi_turn.DialogEvaluator(TOK, SESSIONS[:2], num_turns=9, seq_len=64, max_new_tokens=4)
