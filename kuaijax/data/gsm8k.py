"""GSM8K in its public jsonl format, and the one answer normaliser for gold answers and model outputs.

Each line of a GSM8K file is `{"question": ..., "answer": ...}` where `answer` holds the reasoning
lines with calculator annotations (`48/2 = <<48/2=24>>24`) and a last line `#### 72`. `load_gsm8k`
turns a file into records `{'question', 'solution', 'answer'}`: `solution` is the reasoning lines
with the annotations removed, `answer` the normalised final answer as a string (`"#### 1,200"` ->
`"1200"`). `extract_answer` reads the final answer of a model output (after the last `####` or
`The answer is`) through the same `normalize_answer`, so gold and predicted answers compare as
strings. Registered in `kuaijax.data.sources` as `gsm8k:/path/{split}.jsonl`. Local files only.
"""

from __future__ import annotations

import decimal
import os
import re

from kuaijax.data import records

PREFIX = 'gsm8k:'

_ANNOTATION_RE = re.compile(r'<<[^<>]*>>')
_NUMBER_RE = re.compile(r'-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)')
_GOLD_RE = re.compile(r'-?\$?-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)')  # a `####` value: one number
_FINAL_RE = re.compile(r'####|the answer is', re.IGNORECASE)


def normalize_answer(text: str) -> str | None:
  """The first number in `text` in canonical form, or None if there is none.

  Drops thousands separators, currency signs and units around the number ("$1,200.50 dollars" ->
  "1200.5"), trailing zeros of decimals ("3.0" -> "3", ".50" -> "0.5") and the sign of zero.
  """
  match = _NUMBER_RE.search(text.replace('$', ''))
  if match is None:
    return None
  try:
    value = decimal.Decimal(match.group().replace(',', ''))
  except decimal.InvalidOperation:
    return None
  if value == 0:
    return '0'
  value = value.normalize()
  return f'{value:f}'


def extract_answer(text: str) -> str | None:
  """Normalised final answer of a solution text (gold or model output), or None.

  The answer is the first number after the last `####` or `The answer is` (case-insensitive);
  a text with neither marker, or no number after it, has no answer.
  """
  markers = list(_FINAL_RE.finditer(text))
  if not markers:
    return None
  return normalize_answer(text[markers[-1].end() :])


def parse_record(record, where: str) -> dict:
  """One GSM8K json object -> {'question', 'solution', 'answer'}; ValueError naming `where`."""
  if not isinstance(record, dict):
    raise ValueError(f'{where}: expected a json object, got {type(record).__name__}')
  for field in ('question', 'answer'):
    if not isinstance(record.get(field), str):
      raise ValueError(f'{where}: record has no string field "{field}"')
  reasoning, marker, final = record['answer'].rpartition('####')
  if not marker:
    raise ValueError(f'{where}: answer has no "#### <number>" line')
  if not _GOLD_RE.fullmatch(final.strip()):
    raise ValueError(f'{where}: final answer {final.strip()!r} is not a number')
  lines = [_ANNOTATION_RE.sub('', line).strip() for line in reasoning.splitlines()]
  return {
    'question': record['question'].strip(),
    'solution': '\n'.join(line for line in lines if line),
    'answer': normalize_answer(final),
  }


def load_gsm8k(path: str | os.PathLike) -> list[dict]:
  """Records of a GSM8K jsonl file (blank lines skipped); errors name the file and line."""
  return [parse_record(record, where) for where, record in records.iter_jsonl(path, 'GSM8K')]
