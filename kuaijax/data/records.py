"""Data sets written by pipeline stages: one JSON record per line, readable by people and by stages.

`write_records` writes atomically (a temporary file renamed into place), so a killed stage never
leaves a half-written data set that a resumed run would take as finished. Arrays are stored as
lists; `read_records` returns plain Python values (methods convert what they need).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np


def _plain(value):
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f'cannot store a {type(value).__name__} in a record')


def write_records(path: str, records: Iterable[dict]) -> int:
  """Writes `records` as jsonl to `path` (atomically); returns the number written."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp, count = f'{path}.tmp', 0
  with open(tmp, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, default=_plain) + '\n')
      count += 1
  os.replace(tmp, path)
  return count


def iter_jsonl(path: str | os.PathLike, what: str = 'jsonl') -> Iterator[tuple[str, object]]:
  """(`file:line`, parsed value) for every non-blank line of a jsonl file.

  A missing file is FileNotFoundError naming `what` and the path; a line that is not JSON is
  ValueError naming the file and line. Callers check the records' fields with `where`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} file not found: {path}')
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{line_number}'
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not valid JSON ({e})') from None


def read_records(path: str) -> list[dict]:
  """The records of a jsonl file written by `write_records`; errors name the file and line."""
  return [record for _, record in iter_jsonl(path, 'stage data set')]
