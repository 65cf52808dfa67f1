import numpy as np
import pytest

from kuaijax.data import chat, tokenizers

TOK = tokenizers.ByteTokenizer()
MESSAGES = [
  {'role': 'system', 'content': 'Be brief.'},
  {'role': 'user', 'content': 'Sort 3 1 2.'},
  {'role': 'assistant', 'content': '1 2 3'},
  {'role': 'user', 'content': 'Reverse it — ü.'},
  {'role': 'assistant', 'content': '3 2 1'},
  {'role': 'user', 'content': 'What was the first answer?'},
  {'role': 'assistant', 'content': '1 2 3'},
]


def _scored_ids(example):
  """The target tokens the mask selects."""
  targets = example.tokens[1 : example.length]
  return targets[example.mask[: example.length - 1] > 0].tolist()


def _turn(m):
  """A turn's ids in the 'plain' layout, written out independently: 'Role: content\\n' (+ eos)."""
  ids = TOK.encode(f'{m["role"].capitalize()}: {m["content"]}\n')
  return ids + [TOK.eos_id] if m['role'] == 'assistant' else ids


def _expected(messages, roles):
  return [i for m in messages if m['role'] in roles for i in _turn(m)]


def test_round_trip_and_layout():
  example = chat.chat_example(MESSAGES, TOK, seq_len=256)
  assert example.dropped_exchanges == 0 and example.tokens.shape == example.mask.shape == (256,)
  assert chat.decode_chat(example.tokens, TOK) == MESSAGES
  body = example.tokens[: example.length].tolist()
  assert body == [TOK.bos_id, *(i for m in MESSAGES for i in _turn(m))]
  assert (example.tokens[example.length :] == TOK.pad_id).all()
  assert not example.mask[example.length - 1 :].any()
  # Content with newlines and role-like words inside still round-trips.
  tricky = [
    {'role': 'user', 'content': 'Two lines\nUser said: hi'},
    {'role': 'assistant', 'content': 'ok'},
  ]
  assert chat.decode_chat(chat.chat_example(tricky, TOK, seq_len=128).tokens, TOK) == tricky


def test_loss_on_masks():
  def scored(loss_on):
    return _scored_ids(chat.chat_example(MESSAGES, TOK, seq_len=256, loss_on=loss_on))

  assert scored('assistant') == _expected(MESSAGES, ('assistant',))
  assert scored('last_assistant') == _expected(MESSAGES[-1:], ('assistant',))
  assert scored('user') == _expected(MESSAGES, ('user',))  # Parrot-Ask: only the queries.
  # A Parrot-Ask example may end on the user turn it is taught to write.
  assert _scored_ids(chat.chat_example(MESSAGES[:-1], TOK, seq_len=256, loss_on='user')) == (
    _expected(MESSAGES[:-1], ('user',))
  )
  with pytest.raises(ValueError, match='end with an assistant'):
    chat.chat_example(MESSAGES[:-1], TOK, seq_len=256)
  with pytest.raises(ValueError, match='loss_on'):
    chat.chat_example(MESSAGES, TOK, seq_len=256, loss_on='everything')


def test_truncation_drops_whole_oldest_exchanges():
  full = chat.chat_example(MESSAGES, TOK, seq_len=256).length
  exchange = lambda i: len(_turn(MESSAGES[i])) + len(_turn(MESSAGES[i + 1]))
  cases = [(full, 0), (full - 1, 1), (full - exchange(1), 1), (full - exchange(1) - 1, 2)]
  for seq_len, dropped in cases:
    example = chat.chat_example(MESSAGES, TOK, seq_len=seq_len, loss_on='assistant')
    assert example.dropped_exchanges == dropped, seq_len
    kept = [MESSAGES[0], *MESSAGES[1 + 2 * dropped :]]
    assert chat.decode_chat(example.tokens, TOK) == kept
    assert _scored_ids(example) == _expected(kept, ('assistant',))
  last_only = full - exchange(1) - exchange(3)
  assert chat.chat_example(MESSAGES, TOK, seq_len=last_only - 1) is None  # never mid-turn


@pytest.mark.parametrize(
  ('messages', 'error'),
  [
    ([], 'no messages'),
    ([{'role': 'user', 'content': ' '}, {'role': 'assistant', 'content': 'a'}], 'empty content'),
    ([{'role': 'user'}, {'role': 'assistant', 'content': 'a'}], 'missing or empty'),
    ([{'role': 'assistant', 'content': 'a'}], 'out of order'),
    (
      [{'role': 'user', 'content': 'q'}, {'role': 'user', 'content': 'q'}],
      'message 1.*out of order',
    ),
    ([{'role': 'user', 'content': 'q'}, {'role': 'system', 'content': 's'}], 'out of order'),
    ([{'role': 'bot', 'content': 'q'}], "unknown role 'bot'"),
    ([{'role': 'system', 'content': 's'}], 'only a system'),
  ],
)
def test_bad_conversations(messages, error):
  with pytest.raises(ValueError, match=error):
    chat.validate_messages(messages)


def test_prompts_for_the_next_turn():
  ids, dropped = chat.encode_prompt(MESSAGES[:-1], TOK, next_role='assistant', max_len=256)
  assert dropped == 0 and TOK.decode(ids).endswith('User: What was the first answer?\nAssistant: ')
  # The prompt plus the answer's content, turn ending and eos is exactly the full layout.
  full = chat.chat_example(MESSAGES, TOK, seq_len=256)
  answer = TOK.encode(MESSAGES[-1]['content'] + '\n') + [TOK.eos_id]
  assert np.concatenate([ids, answer]).tolist() == full.tokens[: full.length].tolist()
  assert chat.decode_chat(ids, TOK)[-1] == {'role': 'assistant', 'content': ''}
  short, dropped = chat.encode_prompt(
    MESSAGES[:-1], TOK, next_role='assistant', max_len=len(ids) - 1
  )
  assert dropped == 1 and TOK.decode(short).startswith('System: Be brief.')
  assert chat.encode_prompt(MESSAGES[:-1], TOK, next_role='assistant', max_len=20) is None
  first, _ = chat.encode_prompt([], TOK, next_role='user', max_len=16)
  assert first.tolist() == [TOK.bos_id, *TOK.encode('User: ')]
  with pytest.raises(ValueError, match="must be 'user'"):
    chat.encode_prompt(MESSAGES, TOK, next_role='assistant', max_len=256)
  assert chat.stop_tokens(TOK, 'assistant') == (TOK.eos_id,)
  assert chat.stop_tokens(TOK, 'user') == tuple(TOK.encode('\n'))
  assert chat.turn_affixes('user') == ('User: ', '\n')
  with pytest.raises(ValueError, match='not one of'):
    chat.turn_affixes('user', template='chatml_typo')


def test_own_or_gold_history():
  gold = MESSAGES[1:]
  own = chat.with_answers(gold, ['1 2 3', '3 2'])
  assert [m['content'] for m in own if m['role'] == 'assistant'] == ['1 2 3', '3 2', '1 2 3']
  assert chat.with_answers(gold, []) == gold and gold[3]['content'] == '3 2 1'
  with pytest.raises(ValueError, match='4 answers for 3'):
    chat.with_answers(gold, ['a'] * 4)
  assert chat.session_messages(['q1', 'q2'], ['a1', 'a2']) == [
    {'role': 'user', 'content': 'q1'},
    {'role': 'assistant', 'content': 'a1'},
    {'role': 'user', 'content': 'q2'},
    {'role': 'assistant', 'content': 'a2'},
  ]


def test_corrupted_contexts_for_real_data():
  query = MESSAGES[:-1]  # ends with the third user turn
  rng = np.random.default_rng(0)
  assert chat.corrupted_context(query, 'neglect', rng) == [query[-1]]
  hallucination = chat.corrupted_context(query, 'hallucination', rng)
  assert hallucination == [{'role': 'system', 'content': chat.HALLUCINATION_SYSTEM}, query[-1]]
  seen = set()
  for _ in range(20):
    context = chat.corrupted_context(query, 'misunderstanding', rng)
    assert context[0] == MESSAGES[0] and context[-1] == query[-1] and len(context) == 4
    seen.add(context[1]['content'])
    chat.validate_messages(context)
  assert seen == {'Sort 3 1 2.'}  # the only earlier exchange that is not the latest one
  with pytest.raises(ValueError, match='two earlier exchanges'):
    chat.corrupted_context(query[:3] + query[-1:], 'misunderstanding', rng)
  with pytest.raises(ValueError, match='end with the user query'):
    chat.corrupted_context(MESSAGES, 'neglect', rng)
  with pytest.raises(ValueError, match='unknown context error'):
    chat.corrupted_context(query, 'typo', rng)
