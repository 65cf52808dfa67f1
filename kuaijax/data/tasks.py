"""Tasks by name: which records a data set yields, their prompt / target texts, how to check an answer.

A task record is a JSON-serialisable dict with at least `prompt` (the model input text) and, for
supervised data, `completion` (the gold target text), plus the task's own fields. Methods and stages
only read `prompt` / `completion` and ask the task whether a generated text is correct
(`Task.is_correct(text, record)`), so a new task (e.g. GSM8K) is one `register_task` call:

  register_task('gsm8k', Task(load=..., is_correct=..., group=''))

`group` names a record field that accuracies are broken down by ('level' for kj_arith; '' none).
Built in: 'kj_arith' (word problems, checked by their final answer) and 'kj_dialog' (sessions as
records with `messages`, `kj_dialog.session_record`; scored turn by turn by the kj_dialog8
evaluator, so its `is_correct` raises).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from kuaijax.data import arith, dialog, gsm8k, kj_dialog, sources
from kuaijax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Task:
  """load(split, *, data_dir, limit, levels) -> records; is_correct(text, record) -> bool."""

  load: Callable[..., list[dict]]
  is_correct: Callable[[str, dict], bool]
  group: str = ''


def _decode(value):
  return value.decode('utf-8') if isinstance(value, bytes) else value


def load_kj_arith(
  split: str, *, data_dir: str = '', limit: int = 0, levels: Sequence[int] = arith.LEVELS
) -> list[dict]:
  """kj_arith records of one split (in split order) whose level is in `levels`, at most `limit`
  (0: all)."""
  levels = tuple(levels) or arith.LEVELS
  bad = sorted(set(levels) - set(arith.LEVELS))
  if bad:
    raise ValueError(f'levels={levels} must be a subset of {arith.LEVELS}')
  source = sources.get_data_source('kj_arith', split=split, data_dir=data_dir or None)
  records = []
  for i in range(len(source)):
    ex = {k: _decode(v) for k, v in source[i].items()}
    if int(ex['level']) not in levels:
      continue
    problem = arith.ArithProblem(
      str(ex['question']),
      str(ex['solution']),
      int(ex['answer']),
      int(ex['level']),
      int(ex['steps']),
    )
    records.append(arith.problem_record(problem))
    if limit and len(records) >= limit:
      break
  return records


def load_arith_problems(
  split: str, *, data_dir: str = '', limit: int = 0, levels: Sequence[int] = arith.LEVELS
) -> list[arith.ArithProblem]:
  """`load_kj_arith` as `arith.ArithProblem`s (for experiments that work on problems directly)."""
  records = load_kj_arith(split, data_dir=data_dir, limit=limit, levels=levels)
  return [arith.record_problem(r) for r in records]


def load_dialog_sessions(
  split: str, *, data_dir: str = '', limit: int = 0
) -> list[list[dialog.Turn]]:
  """kj_dialog sessions of one split, in split order (at most `limit`; 0 = all)."""
  source = sources.get_data_source('kj_dialog', split=split, data_dir=data_dir or None)
  count = min(limit, len(source)) if limit else len(source)
  return [kj_dialog.decode_session(source[i]) for i in range(count)]


def load_kj_dialog(split: str, *, data_dir: str = '', limit: int = 0, **unused) -> list[dict]:
  """kj_dialog sessions of one split as records (at most `limit`; 0 = all)."""
  del unused
  sessions = load_dialog_sessions(split, limit=limit, data_dir=data_dir)
  return [kj_dialog.session_record(s) for s in sessions]


def _per_turn_only(text: str, record: dict) -> bool:
  del text, record
  raise ValueError('kj_dialog is scored turn by turn: use the kj_dialog8 evaluator')


TASKS = Registry('task')


def get_task(name: str) -> Task:
  """A registered task, or 'gsm8k:/path/{split}.jsonl' (`gsm8k_task`)."""
  if name.startswith(gsm8k.PREFIX):
    return gsm8k_task(name.removeprefix(gsm8k.PREFIX))
  return TASKS.lookup(name)


def register_task(name: str, task: Task) -> Task:
  return TASKS.register(name)(task)


register_task(
  'kj_arith',
  Task(
    load=load_kj_arith,
    is_correct=lambda text, record: arith.check_answer(text, int(record['answer'])),
    group='level',
  ),
)
register_task('kj_dialog', Task(load=load_kj_dialog, is_correct=_per_turn_only))


def gsm8k_task(pattern: str) -> Task:
  """GSM8K from local jsonl files ('/path/{split}.jsonl', `kuaijax.data.gsm8k`): prompt
  `arith.format_prompt(question)`, completion the reasoning lines + "The answer is N"; a text is
  correct iff its normalised final answer equals the record's."""

  def load(split: str, *, data_dir: str = '', limit: int = 0, levels=()) -> list[dict]:
    del data_dir, levels  # the path names the files; GSM8K has no levels
    records = sources.get_data_source(gsm8k.PREFIX + pattern, split=split)
    records = records[:limit] if limit else records
    return [
      {
        **r,
        'prompt': arith.format_prompt(r['question']),
        'completion': f'{r["solution"]}\nThe answer is {r["answer"]}',
      }
      for r in records
    ]

  return Task(load=load, is_correct=lambda text, r: gsm8k.extract_answer(text) == r['answer'])
