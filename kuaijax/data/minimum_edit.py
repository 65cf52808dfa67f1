"""Minimum-editing teachers and the generative reward model's (GRM) data formats, for RLMEC.

A solution is a list of non-empty lines, its "steps" (the final "The answer is N" line is a step
too); prompts number them from 1 as "[k] ...". For a policy sample (a `Case`), a teacher returns an
`Edit`: a correct sample (its final answer, through `gsm8k.extract_answer`, equals the gold one) is
kept as is (error_step 0); for a wrong one the teacher names the first wrong step k and rewrites by
copying steps 1..k-1 verbatim and continuing with a correct solution. k = len(steps) + 1 means
"every step written is right, the rest is missing" (a cut-off sample).

- `ProgramTeacher` is exact on kj_arith: step k is right iff it parses, its arithmetic holds and its
  result equals gold step k's (so a reordered but equal expression is kept: minimum editing); the
  line after the last gold step must be the gold answer line. The continuation is the gold solution
  from step k on.
- A model teacher (a causal LM driven by the locate and rewrite prompts below, e.g. the trained GRM
  or an imported instruct model) lives in `kuaijax.grm` and returns the same `Edit`s.

GRM data (`grm_examples`) follows the original RLMEC code: per wrong sample whose rewrite reaches
the gold answer, one locate example (numbered gold and prediction -> "The first error step is [k]")
and one rewrite example (raw gold and prediction, "Correct prediction:" -> the rewrite); each correct
sample becomes a copy example (target = the sample) with probability #rewritten / #samples.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from kuaijax.data import arith, gsm8k

LOCATE_TARGET = 'The first error step is [{k}]'
_LOCATE_RE = re.compile(r'\s*The first error step is \[(\d+)\]')
_NUMBER_RE = re.compile(r'^\s*\[\d+\]\s*')

# Notes an Edit can carry (counted by the stages).
NOTES = (
  'correct',  # kept as is
  'rewritten',  # located and rewritten
  'no_steps',  # the sample has no non-empty line (rewritten from scratch)
  'locate_unparsed',  # model teacher: locate output is not "The first error step is [k]" (k=1 used)
  'locate_out_of_range',  # model teacher: k outside 1..len(steps)+1 (clamped)
  'unchanged',  # model teacher: the rewrite of a wrong sample repeats it (dropped downstream)
  'prompt_too_long',  # model teacher: a prompt does not fit (no rewrite; dropped downstream)
)


@dataclasses.dataclass(frozen=True)
class GrmPrompts:
  """Prompt templates of the two GRM tasks (fields: question, solution, prediction).

  locate sees numbered steps and is answered by `LOCATE_TARGET`; rewrite sees the raw texts and ends
  with "Correct prediction:", followed by the rewrite (training, rewriting) or by the sample being
  scored (token rewards). The defaults are short, for byte-level toy models; a model teacher built
  on an instruct model can take the original's longer instructions.
  """

  locate: str = (
    'Locate the first wrong step.\nProblem: {question}\nCorrect solution:\n{solution}\n'
    'Prediction:\n{prediction}\n'
  )
  rewrite: str = (
    'Correct the prediction with minimal edits.\nProblem: {question}\nCorrect solution:\n'
    '{solution}\nPrediction:\n{prediction}\nCorrect prediction:'
  )

  def locate_prompt(self, case: Case) -> str:
    return self.locate.format(
      question=case.question,
      solution=number_steps(case.solution),
      prediction=number_steps(case.prediction),
    )

  def rewrite_prompt(self, case: Case) -> str:
    return self.rewrite.format(
      question=case.question, solution=case.solution, prediction=case.prediction
    )


@dataclasses.dataclass(frozen=True)
class Case:
  """One policy sample to judge: question, gold solution text, normalised gold answer, sample text."""

  question: str
  solution: str
  answer: str
  prediction: str

  @property
  def correct(self) -> bool:
    return gsm8k.extract_answer(self.prediction) == self.answer


@dataclasses.dataclass(frozen=True)
class Edit:
  """A teacher's verdict: first wrong step (1-based; 0 = correct, kept), the rewrite, a note."""

  error_step: int
  rewrite: str
  note: str


def steps(text: str) -> list[str]:
  """The non-empty lines of a solution, stripped."""
  return [line.strip() for line in text.splitlines() if line.strip()]


def number_steps(text: str) -> str:
  """Steps as "[1] ...", "[2] ..." (an existing "[n]" label at the start of a line is replaced)."""
  return '\n'.join(f'[{k}] {_NUMBER_RE.sub("", line)}' for k, line in enumerate(steps(text), 1))


def copy_prefix(prediction: str, error_step: int) -> str:
  """Steps 1..error_step-1 of the prediction, verbatim, one per line ('' when error_step <= 1)."""
  return '\n'.join(steps(prediction)[: max(error_step - 1, 0)])


def join_rewrite(prefix: str, continuation: str) -> str:
  """A rewrite from the copied prefix and the continuation from step k on."""
  continuation = continuation.strip()
  return f'{prefix}\n{continuation}' if prefix else continuation


def locate_target(k: int) -> str:
  return LOCATE_TARGET.format(k=k)


def parse_locate(text: str, num_steps: int) -> tuple[int, str]:
  """(k, note) from a locate output for a prediction of `num_steps` steps.

  "The first error step is [k]" with 1 <= k <= num_steps + 1 -> (k, 'rewritten'); anything else
  that does not parse -> (1, 'locate_unparsed'): rewrite from the start; k out of range ->
  clamped into [1, num_steps + 1], 'locate_out_of_range'.
  """
  match = _LOCATE_RE.match(text)
  if match is None:
    return 1, 'locate_unparsed'
  k = int(match.group(1))
  if 1 <= k <= num_steps + 1:
    return k, 'rewritten'
  return min(max(k, 1), num_steps + 1), 'locate_out_of_range'


class ProgramTeacher:
  """The exact minimum-editing teacher on kj_arith (see the module docstring)."""

  def __call__(self, cases: Sequence[Case]) -> list[Edit]:
    return [self.edit(case) for case in cases]

  @staticmethod
  def first_error(case: Case) -> int:
    """1-based first wrong step of the sample (len(steps) + 1 when all written steps are right)."""
    gold = arith.parse_steps(case.solution)
    lines = steps(case.prediction)
    for k, line in enumerate(lines):
      if k < len(gold):
        parsed = arith.parse_steps(line)
        if len(parsed) != 1 or arith.verify_steps(parsed) is not None:
          return k + 1
        if parsed[0].result != gold[k].result:
          return k + 1
      elif k > len(gold) or gsm8k.extract_answer(line) != case.answer:
        return k + 1
    return len(lines) + 1

  def edit(self, case: Case) -> Edit:
    if case.correct:
      return Edit(0, case.prediction, 'correct')
    k = self.first_error(case)
    gold_lines = steps(case.solution)
    rewrite = join_rewrite(copy_prefix(case.prediction, k), '\n'.join(gold_lines[k - 1 :]))
    return Edit(k, rewrite, 'rewritten' if steps(case.prediction) else 'no_steps')


def reaches_gold(case: Case, edit: Edit) -> bool:
  """Whether the rewrite's final answer is the gold answer."""
  return gsm8k.extract_answer(edit.rewrite) == case.answer


def grm_examples(
  cases: Sequence[Case], edits: Sequence[Edit], *, seed: int, prompts: GrmPrompts = GrmPrompts()
) -> tuple[list[dict], dict]:
  """GRM training records {'prompt', 'target', 'task'} (task: locate / rewrite / copy) and counts.

  Wrong samples whose rewrite reaches the gold answer give a locate and a rewrite example; the
  others (no usable rewrite) are counted and skipped. Each correct sample gives a copy example with
  probability #rewritten / #samples (the original's balance between editing and copying), drawn
  from `random.Random(seed)` in order.
  """
  if len(cases) != len(edits):
    raise ValueError(f'grm_examples: {len(cases)} cases but {len(edits)} edits')
  examples = []
  stats = {'samples': len(cases), 'rewritten': 0, 'unusable': 0, 'correct': 0, 'copy': 0}
  for case, edit in zip(cases, edits):
    if edit.error_step == 0:
      continue
    if not reaches_gold(case, edit):
      stats['unusable'] += 1
      continue
    stats['rewritten'] += 1
    examples.append(
      {
        'prompt': prompts.locate_prompt(case),
        'target': locate_target(edit.error_step),
        'task': 'locate',
      }
    )
    examples.append(
      {'prompt': prompts.rewrite_prompt(case), 'target': edit.rewrite, 'task': 'rewrite'}
    )
  rng = random.Random(seed)
  threshold = stats['rewritten'] / max(len(cases), 1)
  for case, edit in zip(cases, edits):
    if edit.error_step != 0:
      continue
    stats['correct'] += 1
    if rng.random() < threshold:
      stats['copy'] += 1
      examples.append(
        {'prompt': prompts.rewrite_prompt(case), 'target': case.prediction, 'task': 'copy'}
      )
  stats['examples'] = len(examples)
  return examples, stats


def _dedupe_key(text: str) -> str:
  """The original's identity of two correct samples: the text without newlines, spaces and dots."""
  return text.replace('\n', '').replace(' ', '').replace('.', '')


def usable_samples(
  problem_ids: Sequence, cases: Sequence[Case], edits: Sequence[Edit]
) -> tuple[list[int], dict]:
  """Indices of the samples RLMEC trains on, and counts of what was dropped.

  A wrong sample is used iff its rewrite reaches the gold answer (else 'dropped_unreached');
  correct samples are de-duplicated per problem ('duplicates'); 'problems_without_sample' counts
  problems none of whose samples is used.
  """
  if not len(problem_ids) == len(cases) == len(edits):
    raise ValueError(f'{len(problem_ids)} problem ids, {len(cases)} cases, {len(edits)} edits')
  keep, seen = [], set()
  stats = {'samples': len(cases), 'correct': 0, 'wrong': 0, 'dropped_unreached': 0, 'duplicates': 0}
  for i, (pid, case, edit) in enumerate(zip(problem_ids, cases, edits)):
    if edit.error_step == 0:
      key = (pid, _dedupe_key(case.prediction))
      if key in seen:
        stats['duplicates'] += 1
        continue
      seen.add(key)
      stats['correct'] += 1
    elif reaches_gold(case, edit):
      stats['wrong'] += 1
    else:
      stats['dropped_unreached'] += 1
      continue
    keep.append(i)
  used = {problem_ids[i] for i in keep}
  stats['problems_without_sample'] = len(set(problem_ids) - used)
  stats['used'] = len(keep)
  return keep, stats
