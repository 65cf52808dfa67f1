import json
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from kuaijax.data import tokenizers
from kuaijax.evals import judge, multi_turn
from kuaijax.evals.registry import EvalContext, build_evaluators
from kuaijax.jit_cache import split_params
from kuaijax.models.transformer import Transformer, TransformerConfig
from kuaijax.train import checkpoint as ckpt_lib

TOK = tokenizers.ByteTokenizer()

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


QUESTIONS = [
  {'question_id': 1, 'category': 'writing', 'turns': ['w1', 'w2'], 'reference': []},
  {'question_id': 2, 'category': 'math', 'turns': ['m1'], 'reference': ['r1']},
]


def _tiny_model(seed):
  config = TransformerConfig(
    vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32
  )
  return Transformer(config, rngs=nnx.Rngs(seed))


def _first_param(params) -> np.ndarray:
  return np.asarray(jax.tree.leaves(params)[0])


def _load(path, like):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
  return ckpt_lib.load_params(path, abstract, jax.tree.map(lambda x: x.sharding, like))[0]


def test_mt_bench_evaluator_judged_by_the_model_itself_or_a_checkpoint(tmp_path, monkeypatch):
  graphdef, params = split_params(_tiny_model(0))
  _, other = split_params(_tiny_model(1))
  saved = ckpt_lib.Checkpointer(
    str(tmp_path / 'checkpoints'), keep=1, save_every=1, async_save=False
  )
  meta = {'param_signature': ckpt_lib.param_signature(other)}
  saved.maybe_save(3, {'params': other}, None, meta, force=True)
  saved.close()
  calls = []

  def fake_generate(model, tokenizer, conversations, *, max_new_tokens, **options):
    """Answers name their history length; the judge rates 4 (evaluated model) or 9 (checkpoint),
    and never the reference-graded math answer."""
    first = _first_param(nnx.state(model, nnx.Param))
    who = 'self' if np.array_equal(first, _first_param(params)) else 'ckpt'
    assert who == 'self' or np.array_equal(first, _first_param(other))
    if conversations[0][0]['role'] != 'system':
      calls.append(('answer', who, max_new_tokens, options['max_prompt_len']))
      return [f'answer after {len(c) // 2}' for c in conversations], 0
    calls.append(('judge', who, max_new_tokens, options['max_prompt_len']))
    rating = {'self': 4, 'ckpt': 9}[who]
    return [
      'no verdict' if 'Reference' in c[1]['content'] else f'[[{rating}]]' for c in conversations
    ], 1

  monkeypatch.setattr(multi_turn, 'generate_turns', fake_generate)
  options = dict(max_prompt_len=512, max_new_tokens=5, judge_max_new_tokens=7, batch_size=4)
  for judge_ref, rating in (('self', 4.0), (str(tmp_path), 9.0)):
    calls.clear()
    load = None if judge_ref == 'self' else lambda path=judge_ref: (graphdef, _load(path, params))
    evaluator = judge.MTBenchEvaluator(QUESTIONS, TOK, load_judge=load, **options)
    got = evaluator.evaluate(graphdef, params)
    assert got == {
      'mt_bench/score': rating,
      'mt_bench/score/turn_1': rating,
      'mt_bench/score/turn_2': rating,
      'mt_bench/score/category_writing': rating,
      'mt_bench/judged': 3,
      'mt_bench/unrated': 1,
      'mt_bench/truncated_prompts': 1,
    }
    who = 'self' if judge_ref == 'self' else 'ckpt'
    assert calls == [('answer', 'self', 5, 512)] * 2 + [('judge', who, 7, 512)]


def test_mt_bench_evaluator_by_name_with_a_tiny_random_model(tmp_path):
  path = tmp_path / 'question.jsonl'
  path.write_text(''.join(json.dumps(q) + '\n' for q in QUESTIONS))
  block = {
    'type': 'mt_bench',
    'questions': f'mt_bench:{path}',
    'limit': 1,
    'max_prompt_len': 1024,
    'max_new_tokens': 4,
    'judge_max_new_tokens': 4,
    'batch_size': 2,
  }
  evaluators = build_evaluators({'mt': block}, EvalContext(tokenizer=TOK)).evaluators
  assert [q['question_id'] for q in evaluators['mt'].questions] == [1]
  got = evaluators['mt'](_tiny_model(0))
  # Two turns judged; the random model's four-byte verdicts carry no rating.
  assert got['mt_bench/judged'] == 2 and got['mt_bench/unrated'] == 2
  assert math.isnan(got['mt_bench/score']) and got['mt_bench/truncated_prompts'] == 0
  with pytest.raises(ValueError, match='misses option'):
    build_evaluators({'mt': {'type': 'mt_bench'}}, EvalContext(tokenizer=TOK))
