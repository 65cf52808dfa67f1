import json
import pathlib

import pytest

from kuaijax.evals import judge

# FastChat's four single-answer grading prompts (llm_judge/data/judge_prompts.jsonl).
FASTCHAT = {
  p['name']: p
  for p in map(
    json.loads, (pathlib.Path(__file__).parent / 'fixtures/mt_bench_judge_prompts.jsonl').open()
  )
}


@pytest.mark.parametrize(
  ('name', 'turns', 'with_reference'),
  [
    ('single-v1', 1, False),
    ('single-math-v1', 1, True),
    ('single-v1-multi-turn', 2, False),
    ('single-math-v1-multi-turn', 2, True),
  ],
)
def test_prompts_are_fastchats(name, turns, with_reference):
  questions, answers, refs = ['Q1 x', 'Q2 y'][:turns], ['A1', 'A2'][:turns], ['R1', 'R2'][:turns]
  fields = {'question': questions[0], 'answer': answers[0], 'ref_answer_1': refs[0]}
  for i in range(turns):
    fields.update({f'question_{i + 1}': questions[i], f'answer_{i + 1}': answers[i]})
    fields[f'ref_answer_{i + 1}'] = refs[i]
  expected = (FASTCHAT[name]['system_prompt'], FASTCHAT[name]['prompt_template'].format(**fields))
  assert judge.judge_prompt(questions, answers, refs if with_reference else ()) == expected


def test_eight_turn_prompt_judges_the_last_answer():
  questions = [f'question {i}' for i in range(8)]
  system, user = judge.judge_prompt(questions, [f'answer {i}' for i in range(8)])
  assert 'answer to the last user question' in system and system.endswith('"Rating: [[5]]".\n\n')
  assert all(
    f'### User:\nquestion {i}\n\n### Assistant A:\nanswer {i}\n\n' in user for i in range(8)
  )
  with pytest.raises(ValueError, match='2 questions and 1 answers'):
    judge.judge_prompt(questions[:2], ['a'])


@pytest.mark.parametrize(
  ('reply', 'rating'),
  [
    ('Good answer. Rating: [[7]]', 7.0),
    ('[[8.5]]', 8.5),
    ('Rating: [6] (bracket slip)', 6.0),
    ('first [[3]] then [5]', 3.0),
    ('I cannot rate this.', None),
    ('Rating: [[11]]', None),
    ('Rating: 9', None),
  ],
)
def test_parse_rating(reply, rating):
  assert judge.parse_rating(reply) == rating


def test_rate_counts_replies_without_rating():
  prompts = [judge.judge_prompt([f'q{i}'], [f'a{i}']) for i in range(4)]
  fake = judge.FakeJudge(lambda system, user: '[[9]]' if 'a1' in user or 'a3' in user else 'hmm')
  assert judge.rate(fake, prompts) == ([None, 9.0, None, 9.0], 2)
  with pytest.raises(ValueError, match='1 replies for 4 prompts'):
    judge.rate(lambda p: ['[[1]]'], prompts)


def test_mt_bench_scores_with_own_history_and_a_fake_judge():
  questions = [
    {'question_id': 1, 'category': 'writing', 'turns': ['w1', 'w2'], 'reference': []},
    {
      'question_id': 2,
      'category': 'math',
      'turns': ['m1', 'm2', 'm3'],
      'reference': ['r1', 'r2', 'r3'],
    },
  ]
  seen = []

  def answerer(conversations):
    seen.extend(conversations)
    # Answer with the number of earlier turns in the (own) history.
    return [f'answer after {len(c) // 2}' for c in conversations]

  def fake(system, user):
    if 'Reference' in user:
      return 'no verdict'  # unrated: left out of the means and counted
    return f'Rating: [[{user.count("answer after") + 5}]]'

  scores = judge.mt_bench_scores(answerer, judge.FakeJudge(fake), questions)
  assert seen[-1] == [
    {'role': 'user', 'content': 'm1'},
    {'role': 'assistant', 'content': 'answer after 0'},
    {'role': 'user', 'content': 'm2'},
    {'role': 'assistant', 'content': 'answer after 1'},
    {'role': 'user', 'content': 'm3'},
  ]
  # writing: turn 1 judged on 1 answer (6), turn 2 on the transcript of 2 answers (7).
  assert scores == {
    'score': 6.5,
    'score/turn_1': 6.0,
    'score/turn_2': 7.0,
    'score/category_writing': 6.5,
    'judged': 5,
    'unrated': 3,
  }
