import json
import pathlib

import numpy as np
import pytest
from flax import nnx

from kuaijax.data import chat, tokenizers
from kuaijax.evals import judge, multi_turn
from kuaijax.models.transformer import Transformer, TransformerConfig

# FastChat's four single-answer grading prompts (llm_judge/data/judge_prompts.jsonl).
FASTCHAT = {
  p['name']: p
  for p in map(
    json.loads, (pathlib.Path(__file__).parent / 'fixtures/mt_bench_judge_prompts.jsonl').open()
  )
}
TOK = tokenizers.ByteTokenizer()


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


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


def _greedy_reference(model, ids, steps, width=64):
  """Greedy continuation by full causal forward passes (no KV cache), stopping at eos."""
  ids = list(ids)
  out = []
  for _ in range(steps):
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(ids)] = ids  # Causal: the padding after position len - 1 changes nothing.
    token = int(np.argmax(np.asarray(_logits(model, padded))[0, len(ids) - 1]))
    out.append(token)
    if token == TOK.eos_id:
      break
    ids.append(token)
  return TOK.decode(out).strip()


def test_model_judge_and_generate_turns_with_a_small_model():
  config = TransformerConfig(
    vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, d_ff=32, init_std=0.5
  )
  model = Transformer(config, rngs=nnx.Rngs(0))
  conversations = [
    [{'role': 'user', 'content': 'Sort 3 1.'}],
    [
      {'role': 'user', 'content': 'Sort 3 1.'},
      {'role': 'assistant', 'content': '1 3'},
      {'role': 'user', 'content': 'Reverse it.'},
    ],
  ]
  replies, truncated = multi_turn.generate_turns(
    model, TOK, conversations, max_prompt_len=40, max_new_tokens=6
  )
  assert truncated == 1  # the second conversation loses its first exchange to fit 40 tokens
  for messages, reply in zip(conversations, replies, strict=True):
    ids, _ = chat.encode_prompt(messages, TOK, next_role='assistant', max_len=40)
    assert reply == _greedy_reference(model, ids, 6)
  with pytest.raises(ValueError, match='conversation 0'):
    multi_turn.generate_turns(model, TOK, conversations, max_prompt_len=10, max_new_tokens=2)
  # The judge sees (system, user) as a chat; short prompts keep the compiled program shared.
  prompts = [('Rate.', 'Sort 3 1 gave 1 3.'), ('Rate it.', 'Sort 2 1 3.')]
  model_judge = judge.ModelJudge(model, TOK, max_prompt_len=56, max_new_tokens=6)
  replies = model_judge(prompts)
  for (system, user), reply in zip(prompts, replies, strict=True):
    messages = [{'role': 'system', 'content': system}, {'role': 'user', 'content': user}]
    ids, _ = chat.encode_prompt(messages, TOK, next_role='assistant', max_len=56)
    assert reply == _greedy_reference(model, ids, 6)
  assert judge.rate(model_judge, prompts) == ([None, None], 2)  # a random model writes no rating
