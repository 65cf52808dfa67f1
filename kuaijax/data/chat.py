"""Chat layout shared by multi-turn methods: template, validation, loss masks, truncation.

A conversation is a list of messages {'role': 'system'|'user'|'assistant', 'content': str}: an
optional system message, then user and assistant turns alternating, starting with the user. The
template writes it as token ids

  [bos] marker(role_1) content_1 [eos] marker(role_2) content_2 [eos] ...

with plain-text role markers ('User: ', 'Assistant: ', 'System: ') and the tokenizer's eos closing
every turn, so generation of any turn stops at eos. `decode_chat` inverts it.

`encode_chat` lays a conversation out in one row of `seq_len` tokens with a target-aligned loss
mask (mask[t] = 1 iff tokens[t + 1] is scored, the convention of `kuaijax.sampling.score`). What
is scored (`loss_on`): every assistant turn, only the last one (CaPO / evaluation), or every user
turn (the Parrot-Ask query model); a scored turn covers its content and closing eos, never the
marker. Conversations longer than seq_len lose their oldest exchanges (user turn + answer; the
system message stays), never part of a turn; the number of dropped exchanges is returned.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from kuaijax.data.tokenizers import Tokenizer

ROLES = ('system', 'user', 'assistant')
LOSS_ON = ('all_assistant', 'last_assistant', 'user')
Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Role markers written before each turn's content."""

  system: str = 'System: '
  user: str = 'User: '
  assistant: str = 'Assistant: '

  def marker(self, role: str) -> str:
    return getattr(self, role)


DEFAULT_TEMPLATE = ChatTemplate()


@dataclasses.dataclass(frozen=True)
class ChatExample:
  """One laid-out conversation: tokens / mask [seq_len] (the first `length` real, the rest padding)
  and the number of oldest exchanges dropped to fit."""

  tokens: np.ndarray
  mask: np.ndarray
  length: int
  dropped_exchanges: int


def validate_messages(messages: Sequence[Message], *, allow_trailing_user: bool = True) -> None:
  """Raises ValueError naming the first problem: unknown role, empty turn, order of roles."""
  if not messages:
    raise ValueError('conversation has no messages')
  for i, message in enumerate(messages):
    role = message.get('role')
    if role not in ROLES:
      raise ValueError(f'message {i}: unknown role {role!r}; allowed: {", ".join(ROLES)}')
    content = message.get('content')
    if not isinstance(content, str) or not content.strip():
      raise ValueError(f'message {i} ({role}): missing or empty content')
  start = 1 if messages[0]['role'] == 'system' else 0
  for i, message in enumerate(messages[start:], start):
    expected = 'user' if (i - start) % 2 == 0 else 'assistant'
    if message['role'] != expected:
      raise ValueError(
        f'message {i}: role {message["role"]!r} out of order (expected {expected!r}; a '
        'conversation is an optional system message, then user and assistant alternating)'
      )
  if len(messages) == start:
    raise ValueError('conversation has only a system message')
  if not allow_trailing_user and messages[-1]['role'] != 'assistant':
    raise ValueError('conversation must end with an assistant turn')


def _spans(messages, tokenizer, template) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per message: (marker ids, content ids + eos)."""
  return [
    (
      tokenizer.encode_array(template.marker(m['role'])),
      np.append(tokenizer.encode_array(m['content']), tokenizer.eos_id).astype(np.int32),
    )
    for m in messages
  ]


def _exchanges(messages: Sequence[Message]) -> tuple[int, list[list[int]]]:
  """(number of leading system messages, message indices grouped by exchange: user [+ answer])."""
  start = 1 if messages[0]['role'] == 'system' else 0
  rest = list(range(start, len(messages)))
  return start, [rest[i : i + 2] for i in range(0, len(rest), 2)]


def _scored(role: str, index: int, last_assistant: int, loss_on: str) -> bool:
  if loss_on == 'user':
    return role == 'user'
  if loss_on == 'last_assistant':
    return index == last_assistant
  return role == 'assistant'


def encode_chat(
  messages: Sequence[Message],
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  loss_on: str = 'all_assistant',
  template: ChatTemplate = DEFAULT_TEMPLATE,
) -> ChatExample | None:
  """One conversation laid out in seq_len tokens, or None if its last exchange alone does not fit.

  The conversation must be valid (`validate_messages`) and end with the turn kind that is scored
  ('user' needs at least one user turn; the assistant options need an assistant turn).
  """
  if loss_on not in LOSS_ON:
    raise ValueError(f'loss_on={loss_on!r}; allowed: {", ".join(LOSS_ON)}')
  validate_messages(messages, allow_trailing_user=loss_on == 'user')
  spans = _spans(messages, tokenizer, template)
  start, exchanges = _exchanges(messages)
  size = lambda indices: sum(len(spans[i][0]) + len(spans[i][1]) for i in indices)
  budget = seq_len - 1 - size(range(start))  # bos and the system message always stay.
  kept = len(exchanges)
  used = 0
  while kept > 0 and used + size(exchanges[kept - 1]) <= budget:
    used += size(exchanges[kept - 1])
    kept -= 1
  dropped = kept
  if dropped == len(exchanges):
    return None
  indices = list(range(start)) + [i for ex in exchanges[dropped:] for i in ex]
  last_assistant = max((i for i in indices if messages[i]['role'] == 'assistant'), default=-1)
  ids = [np.asarray([tokenizer.bos_id], np.int32)]
  scored = [np.zeros(1, bool)]
  for i in indices:
    marker, content = spans[i]
    ids += [marker, content]
    is_scored = _scored(messages[i]['role'], i, last_assistant, loss_on)
    scored += [np.zeros(len(marker), bool), np.full(len(content), is_scored)]
  ids, scored = np.concatenate(ids), np.concatenate(scored)
  tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
  tokens[: len(ids)] = ids
  mask = np.zeros(seq_len, np.float32)
  mask[: len(ids) - 1] = scored[1:]
  return ChatExample(tokens, mask, len(ids), dropped)


def encode_prompt(
  messages: Sequence[Message],
  tokenizer: Tokenizer,
  *,
  next_role: str,
  max_len: int,
  template: ChatTemplate = DEFAULT_TEMPLATE,
) -> tuple[np.ndarray, int] | None:
  """(ids ending with next_role's marker, dropped exchanges) for generating the next turn.

  The oldest exchanges are dropped until the prompt has at most max_len ids; None when even the
  most recent exchange does not fit. `messages` may be empty (the first user turn).
  """
  if next_role not in ('user', 'assistant'):
    raise ValueError(f'next_role={next_role!r}; must be user or assistant')
  if messages:
    validate_messages(messages)
    expected = 'assistant' if messages[-1]['role'] == 'user' else 'user'
    if next_role != expected:
      raise ValueError(f'next turn must be {expected!r} after a {messages[-1]["role"]!r} turn')
  elif next_role != 'user':
    raise ValueError('an empty conversation continues with a user turn')
  spans = _spans(messages, tokenizer, template)
  marker = tokenizer.encode_array(template.marker(next_role))
  start, exchanges = _exchanges(messages) if messages else (0, [])
  pieces = lambda indices: [x for i in indices for x in spans[i]]
  for dropped in range(len(exchanges) + 1):
    if dropped and dropped == len(exchanges) and next_role == 'assistant':
      return None  # The pending user turn itself would go.
    indices = list(range(start)) + [i for ex in exchanges[dropped:] for i in ex]
    ids = np.concatenate([[tokenizer.bos_id], *pieces(indices), marker]).astype(np.int32)
    if len(ids) <= max_len:
      return ids, dropped
  return None


def decode_chat(
  ids: Sequence[int], tokenizer: Tokenizer, *, template: ChatTemplate = DEFAULT_TEMPLATE
) -> list[Message]:
  """The messages of `encode_chat` / `encode_prompt` ids (padding and bos ignored).

  Raises ValueError when a turn does not start with a role marker.
  """
  ids = np.asarray(ids).reshape(-1)
  ids = ids[(ids != tokenizer.pad_id) & (ids != tokenizer.bos_id)]
  cuts = np.flatnonzero(ids == tokenizer.eos_id)
  pieces = np.split(ids, cuts + 1)
  messages = []
  for piece in pieces:
    closed = len(piece) and piece[-1] == tokenizer.eos_id
    text = tokenizer.decode(piece[:-1] if closed else piece)
    if not text and not closed:
      continue
    for role in ROLES:
      if text.startswith(template.marker(role)):
        messages.append({'role': role, 'content': text.removeprefix(template.marker(role))})
        break
    else:
      raise ValueError(f'turn without a role marker: {text[:40]!r}')
  return messages


def with_answers(messages: Sequence[Message], answers: Sequence[str]) -> list[Message]:
  """The conversation with its first len(answers) assistant turns replaced by `answers`.

  Evaluating with the model's OWN history (as MT-Bench does) feeds its earlier answers back in;
  the GOLD history keeps the reference answers (answers=[]).
  """
  out, used = [], 0
  for message in messages:
    if message['role'] == 'assistant' and used < len(answers):
      message = {'role': 'assistant', 'content': answers[used]}
      used += 1
    out.append(dict(message))
  if used < len(answers):
    raise ValueError(f'{len(answers)} answers for {used} assistant turns')
  return out


def session_messages(user: Sequence[str], assistant: Sequence[str]) -> list[Message]:
  """Alternating user / assistant messages of one session."""
  if len(user) != len(assistant):
    raise ValueError(f'{len(user)} user turns but {len(assistant)} assistant turns')
  return [
    {'role': role, 'content': text}
    for pair in zip(user, assistant, strict=True)
    for role, text in zip(('user', 'assistant'), pair, strict=True)
  ]


HALLUCINATION_SYSTEM = (
  'The earlier conversation is not available. If the question refers to something said before, '
  'guess what it is and answer.'
)


def corrupted_context(
  messages: Sequence[Message], kind: str, rng: np.random.Generator
) -> list[Message]:
  """The conversation (ending with the user query) as a chat model sees it under a context error.

  The real-data form of the CaPO negatives, answered by a chat model: 'neglect' keeps only the
  query; 'hallucination' keeps only the query behind a system message asking to guess what it
  refers to; 'misunderstanding' keeps one earlier exchange that is not the latest one (an
  irrelevant part of the history) before the query. ValueError when the kind is unknown or
  there is no such exchange.
  """
  validate_messages(messages)
  if messages[-1]['role'] != 'user':
    raise ValueError('the conversation must end with the user query to be answered')
  query = dict(messages[-1])
  if kind == 'neglect':
    return [query]
  if kind == 'hallucination':
    return [{'role': 'system', 'content': HALLUCINATION_SYSTEM}, query]
  if kind != 'misunderstanding':
    raise ValueError(
      f'unknown context error {kind!r}; allowed: neglect, hallucination, misunderstanding'
    )
  start, exchanges = _exchanges(messages[:-1])
  if len(exchanges) < 2:
    raise ValueError('misunderstanding needs at least two earlier exchanges')
  chosen = exchanges[int(rng.integers(len(exchanges) - 1))]
  return [*(dict(messages[i]) for i in range(start)), *(dict(messages[i]) for i in chosen), query]
