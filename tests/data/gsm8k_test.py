import json
import pathlib

import pytest

from kuaijax.data import gsm8k, sources, tasks

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def test_fixture_through_sources():
  records = sources.get_data_source(f'gsm8k:{FIXTURES}/gsm8k_{{split}}.jsonl', split='test')
  assert [r['answer'] for r in records] == ['72', '1200', '10', '7.5', '-5', '0']
  raw = [json.loads(line) for line in (FIXTURES / 'gsm8k_test.jsonl').read_text().splitlines()]
  assert len(records) == len(raw)
  for record, line in zip(records, raw):
    assert set(record) == {'question', 'solution', 'answer'}
    assert record['question'] == line['question']
    gold = line['answer'].split('####')[-1].strip()
    assert float(record['answer']) == float(gold.replace(',', ''))  # agrees with the #### value
    assert '<<' not in record['solution'] and '####' not in record['solution']
    assert all(s.strip() for s in record['solution'].split('\n'))
    assert gsm8k.extract_answer(line['answer']) == record['answer']  # one normaliser for both
  assert records[0]['solution'] == (
    'Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.'
  )


@pytest.mark.parametrize(
  'text, answer',
  [
    ('The answer is 1,200.', '1200'),
    ('so $18 per week.\nThe answer is $18 dollars', '18'),
    ('The answer is 3.50 apples', '3.5'),
    ('The answer is .5', '0.5'),
    ('The answer is -0.0', '0'),
    ('The answer is 100', '100'),
    ('[1] 2*3=6\nThe answer is 7\nThe Answer is 8', '8'),
    ('#### 42', '42'),
    ('The answer is none', None),
    ('[1] 2*3=6', None),
  ],
)
def test_extract_answer(text, answer):
  assert gsm8k.extract_answer(text) == answer


def test_errors_name_file_and_line(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.jsonl'):
    sources.get_data_source(f'gsm8k:{tmp_path}/nope.jsonl', split='test')
  good = json.dumps({'question': 'q', 'answer': 'a\n#### 3'})
  cases = {
    'not valid JSON': '{"question": ',
    'no string field "answer"': json.dumps({'question': 'q'}),
    'no "#### <number>" line': json.dumps({'question': 'q', 'answer': 'a\nThe answer is 3'}),
    'is not a number': json.dumps({'question': 'q', 'answer': 'a\n#### three'}),
  }
  for message, line in cases.items():
    path = tmp_path / 'bad.jsonl'
    path.write_text(f'{good}\n\n{line}\n')
    with pytest.raises(ValueError, match=f'bad.jsonl:3: .*{message}'):
      gsm8k.load_gsm8k(path)


def test_gsm8k_task():
  task = tasks.get_task(f'gsm8k:{FIXTURES}/gsm8k_{{split}}.jsonl')
  records = task.load('test', limit=4)
  assert len(records) == 4
  assert records[1]['prompt'] == f'Question: {records[1]["question"]}\nSolution:\n'
  assert records[1]['completion'].endswith('1200 pens.\nThe answer is 1200')
  assert all(task.is_correct(r['completion'], r) for r in records)
  assert not task.is_correct('The answer is 1,201', records[1])
  assert task.is_correct('so $1,200.00 in all. The answer is 1,200.', records[1])
