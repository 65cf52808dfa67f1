import random

import pytest
import tensorflow_datasets as tfds

from kuaijax.data import dialog, kj_dialog, tasks

_WORDS = [
  'first',
  'second',
  'third',
  'fourth',
  'fifth',
  'sixth',
  'seventh',
  'eighth',
  'ninth',
  'tenth',
  'eleventh',
  'twelfth',
]


def _operand(phrase, t, answers, deps):
  if phrase == ['it']:
    deps.add(t - 1)
    return answers[t - 2]
  if phrase[0] == 'the' and phrase[2] == 'answer':
    k = _WORDS.index(phrase[1]) + 1
    deps.add(k)
    return answers[k - 1]
  return [int(w) for w in phrase]


def _run(op, arg, items):
  if op == 'sort':
    return sorted(items)
  if op == 'reverse':
    return list(reversed(items))
  if op == 'append':
    return [*items, arg]
  if op == 'add':
    return [x + arg for x in items]
  return [x for i, x in enumerate(items, 1) if i != arg]


def _reference_session(user_turns):
  """An independent solver: [(answer, depends_on)] from the user texts alone, word by word."""
  answers, ops, out = [], [], []
  for t, text in enumerate(user_turns, 1):
    words = text.rstrip('.?').split()
    deps = set()
    if words[:2] == ['What', 'was']:
      op, result = None, _operand(words[2:], t, answers, deps)
    elif words == ['Do', 'that', 'again']:
      deps.add(t - 1)
      op = ops[t - 2]
      result = _run(*op, answers[t - 2])
    elif words[:2] == ['Same', 'for']:
      deps.add(t - 1)
      op = ops[t - 2]
      result = _run(*op, _operand(words[2:], t, answers, deps))
    else:
      if words[0] in ('Sort', 'Reverse'):
        op, rest = (words[0].lower(), None), words[1:]
      elif words[0] == 'Append':
        op, rest = ('append', int(words[1])), words[3:]
      elif words[0] == 'Add':
        op, rest = ('add', int(words[1])), words[6:]
      else:
        assert words[:2] == ['Remove', 'the'] and words[3:5] == ['number', 'from']
        op, rest = ('remove', _WORDS.index(words[2]) + 1), words[5:]
      result = _run(*op, _operand(rest, t, answers, deps))
    answers.append(result)
    ops.append(op)
    out.append((' '.join(map(str, result)) or 'empty', tuple(sorted(deps))))
  return out


@pytest.fixture(scope='module')
def splits(data_dir):
  return {
    split: [
      kj_dialog.decode_session(ex)
      for ex in tfds.data_source('kj_dialog', split=split, data_dir=data_dir)
    ]
    for split in ('train', 'validation', 'test')
  }


def test_builder_answers_match_an_independent_solver(splits, data_dir):
  builder = tfds.builder('kj_dialog', data_dir=data_dir)
  assert {s: builder.info.splits[s].num_examples for s in splits} == dialog.DEFAULT_SPLIT_SIZES
  kinds, dependent, turns = set(), 0, 0
  for split in ('validation', 'test'):
    for session in splits[split]:
      assert dialog.MIN_TURNS <= len(session) <= dialog.MAX_TURNS
      expected = _reference_session([t.user for t in session])
      assert [(t.assistant, t.depends_on) for t in session] == expected
      assert not session[0].context_dependent
      kinds |= {t.kind for t in session}
      dependent += sum(t.context_dependent for t in session)
      turns += len(session)
  assert kinds == set(dialog.KINDS)
  assert 0.25 < dependent / turns < 0.5  # Parrot-40K: 3.42 of 8.71 turns.


def test_splits_are_disjoint_and_deterministic(splits):
  keys = {s: {tuple(t.user for t in session) for session in v} for s, v in splits.items()}
  assert all(len(keys[s]) == len(splits[s]) for s in splits)
  assert not keys['train'] & keys['validation']
  assert not (keys['train'] | keys['validation']) & keys['test']
  assert dialog.generate_session(2, 5) == dialog.generate_session(2, 5)


def test_render_parse_round_trip_and_bad_queries():
  for index in range(200):
    for turn in dialog.generate_session(0, index):
      assert dialog.render_query(dialog.parse_query(turn.user)) == turn.user
  for text in ('Sort it please.', 'Multiply 2 by 3.', 'What was the zeroth answer?', ''):
    with pytest.raises(dialog.InvalidQuery):
      dialog.parse_query(text)
  with pytest.raises(dialog.InvalidQuery, match='turn 3 does not exist'):
    dialog.run_session(['Sort 3 1.', 'Reverse the third answer.'])
  with pytest.raises(dialog.InvalidQuery, match='does not exist'):
    dialog.run_session(['Do that again.'])
  with pytest.raises(dialog.InvalidQuery, match='no operation to repeat'):
    dialog.run_session(['Sort 3 1.', 'What was the first answer?', 'Same for 5 4.'])
  with pytest.raises(dialog.InvalidQuery, match='cannot remove number 4'):
    dialog.run_session(['Remove the fourth number from 1 2.'])


_SESSION = [
  'Sort 5 1 3.',  # 1 3 5
  'Reverse 2 9.',  # 9 2
  'Append 7 to it.',  # 9 2 7          pronoun -> 2
  'Same for 4 4.',  # 4 4 7            ellipsis -> 3 (append 7)
  'Add 2 to every number in the first answer.',  # 3 5 7   ordinal -> 1
  'Do that again.',  # 5 7 9           again -> 5
  'What was the second answer?',  # 9 2   recall -> 2
]


def test_hand_made_session_and_its_negatives():
  turns = dialog.run_session(_SESSION)
  assert [t.assistant for t in turns] == ['1 3 5', '9 2', '9 2 7', '4 4 7', '3 5 7', '5 7 9', '9 2']
  assert [t.depends_on for t in turns] == [(), (), (2,), (3,), (1,), (5,), (2,)]
  with pytest.raises(ValueError, match='does not depend'):
    dialog.session_negatives(_SESSION, 2)
  # Neglect: no history -> missing lists are empty, a missing operation changes nothing.
  neglect = {t: dialog.session_negatives(_SESSION, t)['neglect'] for t in (3, 4, 5, 6, 7)}
  assert neglect == {3: '7', 4: '4 4', 5: 'empty', 6: 'empty', 7: 'empty'}
  for t in (3, 4, 5, 6, 7):
    negatives = dialog.session_negatives(_SESSION, t)
    assert negatives == dialog.session_negatives(_SESSION, t)  # deterministic
    assert all(v != turns[t - 1].assistant for v in negatives.values() if v is not None)
  # Misunderstanding reads another earlier turn than the one the query needs.
  misread = {
    3: {'1 3 5 7'},  # turn 1's answer + 7 (turn 2 is the referent)
    4: {'4 4'},  # the operation of turn 1 or 2 (sort / reverse) on 4 4
    5: {'11 4', '11 4 9', '6 6 9'},  # +2 on the answers of turns 2, 3, 4
    6: {'1 3 5', '2 9', '9 2 7 7', '4 4 7 7'},  # turn j's operation on turn j's answer
    7: {'1 3 5', '9 2 7', '4 4 7', '3 5 7', '5 7 9'},
  }
  for t, allowed in misread.items():
    assert dialog.session_negatives(_SESSION, t)['misunderstanding'] in allowed, t
  # Hallucination guesses: a made-up list of 2-5 digits for a pronoun, another operation for an
  # ellipsis (sort / reverse, append k != 7, add k).
  hallucinated = dialog.parse_list(dialog.session_negatives(_SESSION, 3)['hallucination'])
  assert hallucinated[-1] == 7 and 3 <= len(hallucinated) <= 6 and hallucinated != (9, 2, 7)
  assert max(hallucinated) <= 9
  guesses = (
    {(4, 4)} | {(4, 4, k) for k in range(10) if k != 7} | {(4 + k,) * 2 for k in range(1, 10)}
  )
  assert dialog.parse_list(dialog.session_negatives(_SESSION, 4)['hallucination']) in guesses


def test_negative_kind_is_checked():
  history = dialog.History()
  query = dialog.parse_query('Sort 2 1.')
  history.add(query, dialog.answer_query(query, history))
  with pytest.raises(ValueError, match='unknown negative kind'):
    dialog.negative_answer(dialog.parse_query('Reverse it.'), history, 'typo', random.Random(0))


def test_capo_pairs_on_a_hand_made_session():
  turns = dialog.run_session(_SESSION)
  records, missing = dialog.capo_pairs([turns], kinds=('neglect', 'misunderstanding'))
  assert missing == {'neglect': 0, 'misunderstanding': 0}
  assert [(r['turn'], r['negative']) for r in records] == [
    (t, kind) for t in (3, 4, 5, 6, 7) for kind in ('neglect', 'misunderstanding')
  ]
  first = records[0]
  assert first['chosen'] == '9 2 7' and first['rejected'] == '7'
  assert first['messages'] == [
    {'role': 'user', 'content': 'Sort 5 1 3.'},
    {'role': 'assistant', 'content': '1 3 5'},
    {'role': 'user', 'content': 'Reverse 2 9.'},
    {'role': 'assistant', 'content': '9 2'},
    {'role': 'user', 'content': 'Append 7 to it.'},
  ]
  assert all(r['chosen'] != r['rejected'] for r in records)
  with pytest.raises(ValueError, match='subset'):
    dialog.capo_pairs([turns], kinds=('random_edit',))


def test_oracle_sessions_answer_and_count_generated_queries():
  script = {
    'Sort 5 1 3.': ['Reverse it.', 'What was the first answer?', 'never asked'],
    'Sort 2 1.': ['Sort the ninth answer.', 'never asked'],  # ends at its bad first query
    'Reverse 4 6.': ['Tell me a joke.'],
  }

  def asker(conversations):
    return [script[c[0]['content']][len(c) // 2 - 1] for c in conversations]

  openings = [[first] for first in script]
  sessions, stats = dialog.oracle_sessions(asker, openings, num_turns=3)
  assert [[t.user for t in s] for s in sessions] == [
    ['Sort 5 1 3.', 'Reverse it.', 'What was the first answer?'],
    ['Sort 2 1.'],
    ['Reverse 4 6.'],
  ]
  assert [t.assistant for t in sessions[0]] == ['1 3 5', '5 3 1', '1 3 5']
  assert stats['queries'] == 2 + 1 + 1 and stats['well_formed'] == 2 / 4
  assert stats['context_dependent'] == 1.0 and stats['turns_per_session'] == 5 / 3
  assert stats['sessions'] == 3 and stats['context_dependent_per_session'] == 2 / 3


def test_kj_dialog_task_records_are_the_sessions_checked_by_the_program(splits, data_dir):
  sessions = splits['validation'][:3]
  assert tasks.load_dialog_sessions('validation', data_dir=data_dir, limit=3) == sessions
  task = tasks.get_task('kj_dialog')
  records = task.load('validation', data_dir=data_dir, limit=3)
  assert records == [kj_dialog.session_record(s) for s in sessions]
  assert records[0]['messages'][:2] == [
    {'role': 'user', 'content': sessions[0][0].user},
    {'role': 'assistant', 'content': sessions[0][0].assistant},
  ]
  assert [kj_dialog.record_turns(r) for r in records] == sessions
  bad = {**records[0], 'messages': [dict(m) for m in records[0]['messages']]}
  bad['messages'][1]['content'] = '99'
  with pytest.raises(ValueError, match='not the program answers'):
    kj_dialog.record_turns(bad)
  with pytest.raises(ValueError, match='turn by turn'):
    task.is_correct('1 2', records[0])
