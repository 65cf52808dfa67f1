import json
import pathlib

import pytest

from kuaijax.data import chat_files, sources

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def test_sharegpt_records_and_skips():
  records, skipped = chat_files.load_sharegpt(FIXTURES / 'sharegpt_train.json')
  assert [r['id'] for r in records] == ['QWJhYvA_0', 'QWJhYvA_1', 'i6IyJda_0']
  assert [m['role'] for m in records[0]['messages']] == ['user', 'assistant'] * 2
  assert records[0]['messages'][2] == {'role': 'user', 'content': 'And who dies first?'}
  # A leading answer (continuation piece) and a trailing unanswered question are dropped.
  assert records[1]['messages'] == [
    {'role': 'user', 'content': 'Shorten that list.'},
    {'role': 'assistant', 'content': '1. Pre-launch 2. Launch 3. Follow-up'},
  ]
  assert records[2]['messages'] == [
    {'role': 'system', 'content': 'You are a terse assistant.'},
    {'role': 'user', 'content': 'Capital of France?'},
    {'role': 'assistant', 'content': 'Paris.'},
  ]
  assert skipped == {'unknown_role': 1, 'empty_content': 1, 'out_of_order': 1, 'no_messages': 2}


def test_sources_by_prefix_with_split(tmp_path):
  path = tmp_path / 'sg_validation.json'
  path.write_text((FIXTURES / 'sharegpt_train.json').read_text())
  source = sources.get_data_source(f'sharegpt:{tmp_path}/sg_{{split}}.json', split='validation')
  assert len(source) == 3 and set(source[0]) == {'id', 'messages'}
  questions = sources.get_data_source(f'mt_bench:{FIXTURES}/question.jsonl', split='test')
  assert [q['question_id'] for q in questions] == [81, 101, 111]
  assert (
    questions[0]['reference'] == [] and questions[1]['reference'][0] == 'You are in second place.'
  )
  assert questions[2] == {
    'question_id': 111,
    'category': 'math',
    'turns': [
      'The vertices of a triangle are at points (0, 0), (-1, 1), and (3, 3). What is the area of '
      'the triangle?',
      "What's area of the circle circumscribing the triangle?",
    ],
    'reference': ['Area is 3', '5pi'],
  }


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='ShareGPT file not found'):
    sources.get_data_source(f'sharegpt:{tmp_path}/none.json', split='train')
  truncated = tmp_path / 'cut.json'
  truncated.write_text((FIXTURES / 'sharegpt_train.json').read_text()[:500])
  with pytest.raises(ValueError, match='cut.json: not valid JSON'):
    chat_files.load_sharegpt(truncated)
  not_list = tmp_path / 'obj.json'
  not_list.write_text('{"conversations": []}')
  with pytest.raises(ValueError, match='expected a JSON list'):
    chat_files.load_sharegpt(not_list)
  for line, error in [
    ('{"question_id": 1, "turns": ["q"]}', r"missing field\(s\) \['category'\]"),
    ('{"question_id": 1, "category": "x", "turns": "q"}', '"turns" must be a list'),
    ('{"question_id": 1, "category": "x", "turns": []}', 'empty'),
    ('{"question_id": 1, "category": "x", "turns": ["q"], "reference": [1]}', '"reference"'),
    ('not json', 'not valid JSON'),
  ]:
    path = tmp_path / 'q.jsonl'
    path.write_text(json.dumps({'question_id': 0, 'category': 'c', 'turns': ['ok']}) + '\n' + line)
    with pytest.raises(ValueError, match=f'q.jsonl:2: .*{error}'):
      chat_files.load_mt_bench(path)
