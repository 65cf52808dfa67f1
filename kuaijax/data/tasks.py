"""Tasks by name: which records a data set yields, their prompt / target texts, how to check an answer.

A task record is a JSON-serialisable dict with at least `prompt` (the model input text) and, for
supervised data, `completion` (the gold target text), plus the task's own fields. Methods and stages
only read `prompt` / `completion` and ask the task whether a generated text is correct
(`Task.is_correct(text, record)`), so a new task (e.g. GSM8K) is one `register_task` call:

  register_task('gsm8k', Task(load=..., is_correct=..., group=''))

`group` names a record field that accuracies are broken down by ('level' for kj_arith; '' none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from kuaijax.data import arith, sources


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


TASKS: dict[str, Task] = {
  'kj_arith': Task(
    load=load_kj_arith,
    is_correct=lambda text, record: arith.check_answer(text, int(record['answer'])),
    group='level',
  ),
}


def register_task(name: str, task: Task) -> Task:
  if name in TASKS:
    raise ValueError(f'task {name!r} is already registered')
  TASKS[name] = task
  return task


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f'data task {name!r} is not one of {sorted(TASKS)}')
  return TASKS[name]
