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
