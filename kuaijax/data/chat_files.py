"""Real multi-turn data from local files: ShareGPT conversations and MT-Bench questions.

ShareGPT (the V3 JSON format: a list of {"id", "conversations": [{"from", "value"}, ...]}) becomes
records {'id', 'messages'} in the layout of `kuaijax.data.chat`. Speakers map as human/user ->
user, gpt/chatgpt/assistant -> assistant, system -> system. As in FastChat's training code,
leading assistant turns (the continuation pieces of split conversations) are dropped, and so is
a trailing user turn that has no answer. Conversations that still do not alternate, contain an
unknown speaker (e.g. 'bing', 'bard') or an empty turn, or end up empty are skipped and counted
per reason; the counts are logged, never raised.

MT-Bench (FastChat's question.jsonl: one {"question_id", "category", "turns", "reference"?} per
line) becomes records {'question_id', 'category', 'turns', 'reference'} (reference [] when absent).
A malformed line is an error naming the file and line.
"""

import collections
import json
import os
import pathlib

from absl import logging

from kuaijax.data import chat, records

_SHAREGPT_ROLES = {
  'human': 'user',
  'user': 'user',
  'gpt': 'assistant',
  'chatgpt': 'assistant',
  'assistant': 'assistant',
  'system': 'system',
}


def _existing(path: str | os.PathLike, what: str) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{what} file not found: {path}')
  return path


def sharegpt_messages(conversation: list) -> list[dict[str, str]]:
  """The chat messages of one ShareGPT conversation; ValueError says why it cannot be used."""
  if not isinstance(conversation, list):
    raise ValueError('no "conversations" list')
  messages = []
  for turn in conversation:
    if not isinstance(turn, dict) or 'from' not in turn or 'value' not in turn:
      raise ValueError('a turn without "from" / "value"')
    role = _SHAREGPT_ROLES.get(turn['from'])
    if role is None:
      raise ValueError(f'unknown role {turn["from"]!r}')
    messages.append({'role': role, 'content': turn['value']})
  start = 1 if messages and messages[0]['role'] == 'system' else 0
  while len(messages) > start and messages[start]['role'] == 'assistant':
    del messages[start]
  if len(messages) > start and messages[-1]['role'] == 'user':
    messages.pop()
  chat.validate_messages(messages, allow_trailing_user=False)
  return messages


_SKIP_REASONS = {
  'unknown role': 'unknown_role',
  'empty content': 'empty_content',
  'out of order': 'out_of_order',
  'end with an assistant': 'out_of_order',
  'no messages': 'no_messages',
  'only a system': 'no_messages',
}


def _skip_reason(error: ValueError) -> str:
  """The counter key of a skipped conversation (the problem `sharegpt_messages` found)."""
  return next((key for text, key in _SKIP_REASONS.items() if text in str(error)), 'malformed')


def load_sharegpt(path: str | os.PathLike) -> tuple[list[dict], collections.Counter]:
  """(records {'id', 'messages'}, skipped conversations counted by reason) of a ShareGPT file."""
  path = _existing(path, 'ShareGPT')
  try:
    with path.open(encoding='utf-8') as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e}); is the file complete?') from e
  if not isinstance(data, list):
    raise ValueError(f'{path}: expected a JSON list of conversations, got {type(data).__name__}')
  records, skipped = [], collections.Counter()
  for index, item in enumerate(data):
    try:
      if not isinstance(item, dict):
        raise ValueError('conversation is not an object')
      messages = sharegpt_messages(item.get('conversations'))
    except ValueError as e:
      skipped[_skip_reason(e)] += 1
      continue
    records.append({'id': str(item.get('id', index)), 'messages': messages})
  if skipped:
    logging.warning(
      '%s: skipped %d of %d conversations: %s',
      path,
      sum(skipped.values()),
      len(data),
      dict(skipped),
    )
  return records, skipped


def load_mt_bench(path: str | os.PathLike) -> list[dict]:
  """MT-Bench question records of a question.jsonl file, in file order."""
  out = []
  for where, record in records.iter_jsonl(path, 'MT-Bench question'):
    if not isinstance(record, dict):
      raise ValueError(f'{where}: expected a JSON object, got {type(record).__name__}')
    missing = [k for k in ('question_id', 'category', 'turns') if k not in record]
    if missing:
      raise ValueError(f'{where}: missing field(s) {missing}')
    turns, reference = record['turns'], record.get('reference', [])
    for name, value in (('turns', turns), ('reference', reference)):
      if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f'{where}: "{name}" must be a list of strings')
    if not turns or not all(t.strip() for t in turns):
      raise ValueError(f'{where}: "turns" is empty or has an empty turn')
    out.append(
      {
        'question_id': int(record['question_id']),
        'category': str(record['category']),
        'turns': list(turns),
        'reference': list(reference),
      }
    )
  return out
