"""Rule-based final-answer extraction per answer type, the step Self-Consistency votes over.

`extract_answer(text, answer_type)` first looks for the answer trigger ("The answer is", the last
occurrence wins) and cleans what follows it by the answer type; with `mode='clean'` and no trigger
it falls back to answer-cleaning rules over the whole text (the last number, the last option letter (bracketed first),
the last yes/no word, the last non-empty line). It returns a normalised string, or None when nothing
parses, so callers can count unparsable paths instead of voting for garbage.

Normal forms: number '17' / '-3' / '2.5' (thousands separators and a trailing '.0' dropped); choice
'A'..'Z' upper case; yes_no 'yes' | 'no'; text lower case, single-spaced, without the final period.
"""

from __future__ import annotations

import re

ANSWER_TYPES = ('number', 'choice', 'yes_no', 'text')
MODES = ('trigger', 'clean')
TRIGGER = 'The answer is'

_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?|-?\.\d+')
# Option letters: bracketed "(B)" anywhere, else a bare capital A-E standing alone ("B", "B.", "B)").
_CHOICE_BRACKETED = re.compile(r'\(([A-Z])\)')
_CHOICE_BARE = re.compile(r'(?<![A-Za-z])([A-E])(?![A-Za-z])')
_YES_NO = re.compile(r'\b(yes|no)\b', re.IGNORECASE)


def check_answer_type(answer_type: str) -> None:
  if answer_type not in ANSWER_TYPES:
    raise ValueError(f'answer_type={answer_type!r} is not one of {list(ANSWER_TYPES)}')


def normalise_number(text: str) -> str | None:
  """'1,234' -> '1234', '5.0' -> '5', '-.5' -> '-0.5'; None when `text` is not a number."""
  text = text.replace(',', '').strip()
  try:
    value = float(text)
  except ValueError:
    return None
  if value == int(value) and abs(value) < 2**53:
    return str(int(value))
  return repr(value)


def clean_answer(segment: str, answer_type: str, *, first: bool) -> str | None:
  """The answer of one type in `segment`: the first match (after a trigger) or the last one."""
  pick = (lambda ms: ms[0]) if first else (lambda ms: ms[-1])
  if answer_type == 'number':
    matches = _NUMBER.findall(segment)
    return normalise_number(pick(matches)) if matches else None
  if answer_type == 'choice':
    matches = _CHOICE_BRACKETED.findall(segment) or _CHOICE_BARE.findall(segment)
    return pick(matches) if matches else None
  if answer_type == 'yes_no':
    matches = _YES_NO.findall(segment)
    return pick(matches).lower() if matches else None
  lines = [line for line in segment.splitlines() if line.strip()]
  if not lines:
    return None
  answer = ' '.join(pick(lines).split()).lower().rstrip('.').strip()
  return answer or None


def extract_answer(
  text: str, answer_type: str = 'number', *, mode: str = 'clean', trigger: str = TRIGGER
) -> str | None:
  """The normalised final answer of a reasoning path, or None when none can be extracted.

  mode='trigger': only the text after the last `trigger` (to the end of its line) counts.
  mode='clean': the trigger first; without one, the type's cleaning rule over the whole text.
  """
  check_answer_type(answer_type)
  if mode not in MODES:
    raise ValueError(f'mode={mode!r} is not one of {list(MODES)}')
  if not trigger:
    raise ValueError('trigger must be a non-empty string')
  position = text.rfind(trigger)
  if position >= 0:
    after = text[position + len(trigger) :].lstrip(' :')
    line = after.split('\n', 1)[0]
    return clean_answer(line, answer_type, first=True)
  if mode == 'trigger':
    return None
  return clean_answer(text, answer_type, first=False)
