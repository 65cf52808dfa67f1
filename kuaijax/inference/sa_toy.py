"""The Self-Agreement toy tasks: what a small model trained from scratch learns and is asked.

A small model has no aggregation ability, which LLMs bring from pre-training, so one SFT run teaches
both (`training_pairs`): the policy (kj_arith solutions with the "The answer is" trigger, the same
problems in a no-trigger "Let's think step by step." format ending at the last step, and a word
task answered by its last line) and a generic aggregation task built only from TRAINING problems:
candidate sets of 1..k_max solutions (last lines, majority answer drawn at random) -> the majority
answer (SA format) or the number of the first response holding it (USC format).

`eval_items` gives the held-out questions per scenario ('trigger': kj_arith with the trigger;
'mixed': kj_arith without the trigger plus word questions never seen in training).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from kuaijax.data import arith, tasks
from kuaijax.inference import aggregate, answers
from kuaijax.inference.compare import Item

SCENARIOS = ('trigger', 'mixed')
TOY_SA_INSTRUCTION = 'Count the final answers and reply with the most common one.'
TOY_USC_INSTRUCTION = 'Pick the response that agrees with the most others.'
WORDS = (
  'apple',
  'bread',
  'cloud',
  'dance',
  'eagle',
  'flame',
  'grape',
  'horse',
  'igloo',
  'jelly',
  'kite',
  'lemon',
  'mango',
  'night',
  'ocean',
  'piano',
  'queen',
  'river',
  'snake',
  'tiger',
  'umbra',
  'violin',
  'water',
  'xenon',
  'yacht',
  'zebra',
)
NO_TRIGGER_CUE = "Let's think step by step."
TRAIN_WORD_SEED = 0  # training word questions: `word_problems(TRAIN_WORD_SEED, n)`
EVAL_WORD_SEED = 2  # held-out word questions (those of the training set excluded)


def no_trigger_prompt(question: str) -> str:
  return f'Question: {question}\n{NO_TRIGGER_CUE}\n'


def without_trigger(solution: str) -> str:
  """A kj_arith gold solution without its answer line (it ends at the last step)."""
  return '\n'.join(line for line in solution.splitlines() if answers.TRIGGER not in line)


def word_problem(rng: random.Random) -> tuple[str, str, str]:
  """(question, solution, answer): the alphabetically first of 3-4 words, answered on the last line."""
  words = rng.sample(WORDS, rng.randint(3, 4))
  ordered = sorted(words)
  question = f'Which word comes first in the alphabet: {", ".join(words)}?'
  return question, f'Sorted: {", ".join(ordered)}\n{ordered[0]}', ordered[0]


def word_problems(seed: int, count: int, exclude=frozenset()) -> list[tuple[str, str, str]]:
  rng, out = random.Random(f'sa_words/{seed}'), []
  while len(out) < count:
    item = word_problem(rng)
    if item[0] not in exclude:
      out.append(item)
  return out


def _distractors(rng: random.Random, answer: str, answer_type: str) -> list[str]:
  if answer_type == 'number':
    value = int(answer)
    return [str(v) for v in rng.sample([value + d for d in (-3, -2, -1, 1, 2, 3, 10)], 3) if v >= 0]
  return rng.sample([w for w in WORDS if w != answer], 3)


def candidate_set(rng: random.Random, answer: str, answer_type: str, render, k: int):
  """k rendered candidate solutions whose answers mix `answer` with up to 3 distractors; returns
  (texts, their answers, majority answer with ties to the first occurrence)."""
  pool = [answer] + _distractors(rng, answer, answer_type)
  weights = [rng.random() ** 0.5 for _ in pool]
  picks = rng.choices(pool, weights=weights, k=k)
  return [render(a) for a in picks], picks, aggregate.majority_vote(picks).answer


def _renderers(problem: arith.ArithProblem):
  """How the last line of a solution to `problem` looks with a given answer: trigger and
  no-trigger formats."""
  last_step = without_trigger(problem.solution).splitlines()[-1]
  head = last_step.rsplit('=', 1)[0]
  return (lambda a: f'{answers.TRIGGER} {a}'), (lambda a: f'{head}={a}')


def training_pairs(
  problems: Sequence[arith.ArithProblem],
  words: Sequence[tuple[str, str, str]],
  *,
  sets: int,
  k_choices: Sequence[int],
  rng: random.Random,
) -> list[tuple[str, str]]:
  """(prompt, completion) pairs: the policy's three formats, then `sets` SA and USC aggregation
  examples (k drawn from `k_choices`)."""
  pairs = []
  for p in problems:
    pairs.append((arith.format_prompt(p.question), p.solution))
    pairs.append((no_trigger_prompt(p.question), without_trigger(p.solution)))
  pairs += [(no_trigger_prompt(q), s) for q, s, _ in words]
  pool = [(p.question, str(p.answer), 'number', r) for p in problems for r in _renderers(p)]
  pool += [(q, a, 'text', lambda x: x) for q, _, a in words]
  for _ in range(sets):
    question, answer, answer_type, render = pool[rng.randrange(len(pool))]
    k = rng.choice(tuple(k_choices))
    texts, picks, majority = candidate_set(rng, answer, answer_type, render, k)
    sa = aggregate.self_agreement_prompt(
      question, texts, instruction=TOY_SA_INSTRUCTION, max_solution_lines=1
    )
    pairs.append((sa, f' {majority}'))
    usc = aggregate.usc_prompt(
      question, texts, instruction=TOY_USC_INSTRUCTION, max_response_lines=1
    )
    pairs.append((usc, f' {picks.index(majority) + 1}'))
  return pairs


def eval_items(
  *,
  levels: Sequence[int],
  problems_per_level: int,
  word_questions: int,
  train_word_examples: int,
  data_dir: str = '',
) -> dict[str, list[Item]]:
  """Held-out items per scenario: kj_arith test problems (`problems_per_level` of each level) and
  `word_questions` word questions that are not among the first `train_word_examples` training
  ones."""
  problems = []
  for level in levels:
    problems += tasks.load_arith_problems(
      'test', levels=(level,), limit=problems_per_level, data_dir=data_dir
    )
  train_words = {q for q, _, _ in word_problems(TRAIN_WORD_SEED, train_word_examples)}
  words = word_problems(EVAL_WORD_SEED, word_questions, exclude=train_words)
  trigger = [
    Item(p.question, arith.format_prompt(p.question), str(p.answer), 'number') for p in problems
  ]
  mixed = [
    Item(p.question, no_trigger_prompt(p.question), str(p.answer), 'number') for p in problems
  ]
  mixed += [Item(q, no_trigger_prompt(q), a, 'text') for q, _, a in words]
  return {'trigger': trigger, 'mixed': mixed}


def aggregation_prompting(prompts: str) -> dict:
  """Instructions and solution lines of the SA / USC prompts for `prompts` ('toy' | 'paper')."""
  if prompts == 'toy':  # what the toy SFT taught: short instructions, last lines only
    return dict(sa_instruction=TOY_SA_INSTRUCTION, usc_instruction=TOY_USC_INSTRUCTION, lines=1)
  if prompts == 'paper':  # whole solutions under the paper's instructions
    return dict(
      sa_instruction=aggregate.SA_INSTRUCTION, usc_instruction=aggregate.USC_INSTRUCTION, lines=0
    )
  raise ValueError(f"prompts={prompts!r} is not one of ['paper', 'toy']")
