"""Pluggable answer judges for multi-turn benchmarks (MT-Bench single-answer grading).

A judge is any callable mapping a list of (system, user) judge prompts to a list of replies: `ModelJudge` asks a
kuaijax model (greedy, through the chat layout), `FakeJudge` a Python function (tests, exact-match
stand-ins). `judge_prompt` writes FastChat's single-answer grading prompt (single-v1, with a
reference answer when given, and its multi-turn form scoring the last answer); `parse_rating`
reads the "[[rating]]" verdict; `rate` runs a judge over many answers and counts the replies that
carry no rating (skipped, never an error).

`MTBenchEvaluator`, registered as 'mt_bench', grades the evaluated model's own answers to MT-Bench
questions with a `ModelJudge`: the evaluated model itself (judge='self') or any model the pipeline
loads as a model role (judge='/path/to/workdir' or a Hugging Face folder, judge_model='<role>').
"""

import re
from collections.abc import Callable, Sequence
from typing import Protocol

from flax import nnx

from kuaijax.data import sources
from kuaijax.evals import multi_turn
from kuaijax.evals.base import Evaluator
from kuaijax.evals.registry import register_evaluator

_CRITERIA = (
  'Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, '
  'creativity, and level of detail of the response. '
)
_CRITERIA_REF = (
  'Your evaluation should consider correctness and helpfulness. You will be given a reference '
  "answer and the assistant's answer. "
)
_BEGIN = 'Begin your evaluation by providing a short explanation. '
_BEGIN_REF = (
  "Begin your evaluation by comparing the assistant's answer with the reference answer. Identify "
  'and correct any mistakes. '
)
_RATE = (
  'Be as objective as possible. After providing your explanation, you must rate the response on a '
  'scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".'
)
_JUDGE = (
  'Please act as an impartial judge and evaluate the quality of the response provided by an AI '
)
# FastChat's wording (typo included) so that 2-turn prompts are exactly MT-Bench's.
_FOCUS = "You evaluation should focus on the assistant's answer to the {which}{user}question. "
SINGLE_TURN_SYSTEM = 'You are a helpful assistant.'
_RATING_RE = re.compile(r'\[\[(\d+\.?\d*)\]\]')
_RATING_BACKUP_RE = re.compile(r'\[(\d+\.?\d*)\]')


class Judge(Protocol):
  def __call__(self, prompts: Sequence[tuple[str, str]]) -> list[str]: ...


def judge_prompt(
  questions: Sequence[str], answers: Sequence[str], references: Sequence[str] = ()
) -> tuple[str, str]:
  """(system, user) messages that ask a judge to grade the LAST answer (questions[i] -> answers[i]).

  One turn gives FastChat's single-v1 prompt (single-math-v1 with reference answers), two turns
  its single-v1-multi-turn / single-math-v1-multi-turn prompts, word for word; more turns (MT-Bench++)
  the same multi-turn prompt over the whole conversation, focused on the last answer.
  """
  if not questions or len(questions) != len(answers):
    raise ValueError(f'{len(questions)} questions and {len(answers)} answers; need equal, >= 1')
  if references and len(references) < len(questions):
    raise ValueError(f'{len(references)} references for {len(questions)} turns')
  criteria, begin = (_CRITERIA_REF, _BEGIN_REF) if references else (_CRITERIA, _BEGIN)
  if len(questions) == 1:
    parts = [
      f'[Instruction]\n{_JUDGE}assistant to the user question displayed below. {criteria}{begin}{_RATE}',
      f'[Question]\n{questions[0]}',
    ]
    if references:
      parts.append(
        f'[The Start of Reference Answer]\n{references[0]}\n[The End of Reference Answer]'
      )
    parts.append(
      f"[The Start of Assistant's Answer]\n{answers[0]}\n[The End of Assistant's Answer]"
    )
    return SINGLE_TURN_SYSTEM, '\n\n'.join(parts)

  def transcript(title: str, speaker: str, replies: Sequence[str]) -> str:
    body = ''.join(
      f'### User:\n{q}\n\n### {speaker}:\n{a}\n\n' for q, a in zip(questions, replies, strict=False)
    )
    return f'<|The Start of {title}|>\n\n{body}<|The End of {title}|>'

  which = 'second' if len(questions) == 2 else 'last'
  if references:
    head = 'assistant to the user question. '
    focus = _FOCUS.format(which=which, user=' ')
    system = f'{_JUDGE}{head}{criteria}{focus}{begin}{_RATE}\n\n'
    user = '\n\n\n'.join(
      [
        transcript('Reference Answer', 'Reference answer', references),
        transcript("Assistant A's Conversation with User", 'Assistant A', answers),
      ]
    )
  else:
    head = 'assistant to the user question displayed below. '
    focus = _FOCUS.format(which=which, user=' user ')
    system = f'{_JUDGE}{head}{criteria}{focus}{begin}{_RATE}\n\n'
    user = transcript("Assistant A's Conversation with User", 'Assistant A', answers)
  return system, user


def parse_rating(reply: str) -> float | None:
  """The rating in "[[x]]" (else "[x]"), as FastChat reads it; None when absent or not in 1..10."""
  match = _RATING_RE.search(reply) or _RATING_BACKUP_RE.search(reply)
  if not match:
    return None
  rating = float(match.group(1))
  return rating if 1 <= rating <= 10 else None


def rate(judge: Judge, prompts: Sequence[tuple[str, str]]) -> tuple[list[float | None], int]:
  """(rating per prompt, None where the reply had no rating; number of such unrated replies)."""
  replies = judge(list(prompts))
  if len(replies) != len(prompts):
    raise ValueError(f'judge returned {len(replies)} replies for {len(prompts)} prompts')
  ratings = [parse_rating(r) for r in replies]
  return ratings, sum(r is None for r in ratings)


class FakeJudge:
  """A judge backed by a Python function (system, user) -> reply."""

  def __init__(self, reply: Callable[[str, str], str]):
    self.reply = reply

  def __call__(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
    return [self.reply(system, user) for system, user in prompts]


class ModelJudge:
  """A kuaijax chat model as the judge: (system, user) -> its greedy reply."""

  def __init__(self, model, tokenizer, **generate_options):
    """generate_options: max_prompt_len, max_new_tokens, batch_size of `generate_turns`."""
    self.answerer = multi_turn.ModelAnswerer(model, tokenizer, **generate_options)

  def __call__(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
    return self.answerer(
      [
        [{'role': 'system', 'content': system}, {'role': 'user', 'content': user}]
        for system, user in prompts
      ]
    )


# FastChat grades these categories against the reference answers.
REFERENCE_CATEGORIES = ('math', 'reasoning', 'coding', 'arena-hard-200')


def mt_bench_scores(answerer, judge: Judge, questions: Sequence[dict]) -> dict:
  """MT-Bench(++) single-answer grading: every turn answered with the model's own history, then
  judged 1-10 (the last answer, in the context of the earlier turns).

  answerer: conversations -> next assistant turns (e.g. `multi_turn.ModelAnswerer`); questions:
  `mt_bench:` records. Returns the mean rating overall, per turn and per category over the rated
  replies, and how many judge replies carried no rating (left out of the means).
  """
  replies: list[list[str]] = [[] for _ in questions]
  for k in range(max((len(q['turns']) for q in questions), default=0)):
    active = [i for i, q in enumerate(questions) if len(q['turns']) > k]
    conversations = []
    for i in active:
      turns = questions[i]['turns']
      history = [
        {'role': role, 'content': text}
        for q, a in zip(turns[:k], replies[i], strict=True)
        for role, text in (('user', q), ('assistant', a))
      ]
      conversations.append([*history, {'role': 'user', 'content': turns[k]}])
    for i, reply in zip(active, answerer(conversations), strict=True):
      replies[i].append(reply)
  prompts, keys = [], []
  for q, answers in zip(questions, replies, strict=True):
    use_reference = q['category'] in REFERENCE_CATEGORIES and q['reference']
    for k in range(len(q['turns'])):
      references = q['reference'][: k + 1] if use_reference else ()
      prompts.append(judge_prompt(q['turns'][: k + 1], answers[: k + 1], references))
      keys.append((k + 1, q['category']))
  ratings, unrated = rate(judge, prompts)
  rated = [(key, r) for key, r in zip(keys, ratings, strict=True) if r is not None]
  out = {'score': sum(r for _, r in rated) / len(rated) if rated else float('nan')}
  for name, select in (('turn', lambda key: key[0]), ('category', lambda key: key[1])):
    for value in sorted({select(key) for key, _ in rated}, key=str):
      scores = [r for key, r in rated if select(key) == value]
      out[f'score/{name}_{value}'] = sum(scores) / len(scores)
  out.update(judged=len(prompts), unrated=unrated)
  return out


SELF_JUDGE = 'self'


class MTBenchEvaluator(Evaluator):
  """`mt_bench_scores` of the evaluated model (greedy answers, own history) under a model judge.

  load_judge: None (the evaluated model grades its own answers) or a function returning the judge's
  (graphdef, params), called once at the first evaluation: any model, of any architecture (the
  pipeline loads a checkpoint or a Hugging Face folder as a model role, `EvalContext.load_model`).
  Answers and verdicts are generated with `multi_turn.generate_turns` (prompts cut to
  max_prompt_len from the oldest exchanges). Metrics: mt_bench/score, mt_bench/score/turn_k,
  mt_bench/score/category_c, mt_bench/judged, mt_bench/unrated, mt_bench/truncated_prompts.
  """

  def __init__(
    self,
    questions: Sequence[dict],
    tokenizer,
    *,
    load_judge: Callable[[], tuple] | None = None,
    max_prompt_len: int,
    max_new_tokens: int,
    judge_max_new_tokens: int,
    batch_size: int = 64,
  ):
    if not questions:
      raise ValueError('mt_bench: no questions')
    self.questions, self.tokenizer, self.load_judge = list(questions), tokenizer, load_judge
    self.options = {'max_prompt_len': max_prompt_len, 'batch_size': batch_size}
    self.max_new_tokens, self.judge_max_new_tokens = max_new_tokens, judge_max_new_tokens
    self._judge = None

  def judge_model(self, graphdef, params):
    """The judge: the evaluated model itself, or the loaded one (loaded once)."""
    if self.load_judge is None:
      return nnx.merge(graphdef, params)
    if self._judge is None:
      self._judge = nnx.merge(*self.load_judge())
    return self._judge

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    answerer = multi_turn.ModelAnswerer(
      nnx.merge(graphdef, params),
      self.tokenizer,
      max_new_tokens=self.max_new_tokens,
      **self.options,
    )
    judge = ModelJudge(
      self.judge_model(graphdef, params),
      self.tokenizer,
      max_new_tokens=self.judge_max_new_tokens,
      **self.options,
    )
    scores = mt_bench_scores(answerer, judge, self.questions)
    scores['truncated_prompts'] = answerer.truncated + judge.answerer.truncated
    return {f'mt_bench/{k}': v for k, v in scores.items()}


@register_evaluator('mt_bench')
def build(options: dict, ctx) -> MTBenchEvaluator:
  """MT-Bench single-answer grading by a model judge. Options: questions ('mt_bench:/path/
  question.jsonl', `kuaijax.data.chat_files.load_mt_bench`), limit (0 = all), judge ('self', or
  a kuaijax checkpoint path or Hugging Face folder), judge_model (the model role the judge is, in
  config.models; default 'policy'), max_prompt_len, max_new_tokens (answers), judge_max_new_tokens,
  batch_size."""
  questions = sources.get_data_source(options['questions'], split='test')
  limit = options.get('limit', 0)
  judge, role = options.get('judge', SELF_JUDGE), options.get('judge_model', 'policy')
  if not judge:
    raise ValueError(f'mt_bench: judge must be {SELF_JUDGE!r}, a checkpoint path or an HF folder')
  load_judge = None
  if judge != SELF_JUDGE:
    if ctx.load_model is None:
      raise ValueError(f'mt_bench: judge={judge!r} needs a pipeline that loads models')
    load_judge = lambda: ctx.load_model(judge, role)  # noqa: E731
  return MTBenchEvaluator(
    questions[:limit] if limit else questions,
    ctx.tokenizer,
    load_judge=load_judge,
    max_prompt_len=options['max_prompt_len'],
    max_new_tokens=options['max_new_tokens'],
    judge_max_new_tokens=options['judge_max_new_tokens'],
    batch_size=options['batch_size'],
  )
