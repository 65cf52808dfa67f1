"""Multi-turn conversations on the shared chat layout: validation, truncation, prompts, decoding.

A conversation is a list of messages {'role': 'system'|'user'|'assistant', 'content': str}: an
optional system message, then user and assistant turns alternating, starting with the user. The
token layout is `kuaijax.data.sequences.chat_sequence` (a registered template renders each turn,
e.g. 'plain': 'User: ...\\n'; assistant turns end with eos; loss on every assistant turn, only the
last one, or the user turns for a query model such as Parrot-Ask). This module adds what multi-turn
methods need on top of it:
- `validate_messages`: a clear error for unknown roles, missing or empty turns, roles out of order;
- `chat_example`: one row of seq_len tokens; a conversation that is too long loses its oldest
  exchanges (user turn + answer; the system message stays), never part of a turn, and the number
  dropped is returned;
- `encode_prompt`: the ids to generate the next user or assistant turn from (same truncation), and
  `stop_tokens`, where that turn ends;
- `decode_chat`: the messages back from ids (the template round trip);
- `with_answers`: the conversation with the model's OWN earlier answers as history, or the gold ones;
- `corrupted_context`: the three CaPO context errors for real conversations.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from kuaijax.data import sequences
from kuaijax.data.tokenizers import Tokenizer

ROLES = sequences.CHAT_ROLES
LOSS_ON = sequences.CHAT_LOSS_ON
Message = dict[str, str]
_SENTINEL = '\x00kuaijax-content\x00'


@dataclasses.dataclass(frozen=True)
class ChatExample:
  """One laid-out conversation: tokens / mask [seq_len] (the first `length` real, the rest padding)
  and the number of oldest exchanges dropped to fit."""

  tokens: np.ndarray
  mask: np.ndarray
  length: int
  dropped_exchanges: int


def turn_affixes(role: str, template: str = 'plain') -> tuple[str, str]:
  """(text before, text after) the content in the template's rendering of a `role` turn."""
  if template not in sequences.CHAT_TEMPLATES:
    raise ValueError(f'chat template {template!r} is not one of {sorted(sequences.CHAT_TEMPLATES)}')
  before, sep, after = sequences.CHAT_TEMPLATES[template](role, _SENTINEL).partition(_SENTINEL)
  if not sep:
    raise ValueError(f'chat template {template!r} does not write the content of a {role} turn')
  return before, after


def validate_messages(
  messages: Sequence[Message],
  *,
  allow_trailing_user: bool = True,
  allow_empty_answers: bool = False,
) -> None:
  """Raises ValueError naming the first problem: unknown role, empty turn, order of roles.

  allow_empty_answers: an assistant turn may be empty (a model's own earlier, empty reply).
  """
  if not messages:
    raise ValueError('conversation has no messages')
  for i, message in enumerate(messages):
    role = message.get('role')
    if role not in ROLES:
      raise ValueError(f'message {i}: unknown role {role!r}; allowed: {", ".join(ROLES)}')
    content = message.get('content')
    empty_ok = allow_empty_answers and role == 'assistant' and isinstance(content, str)
    if not empty_ok and (not isinstance(content, str) or not content.strip()):
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


def _exchanges(messages: Sequence[Message]) -> tuple[int, list[list[int]]]:
  """(number of leading system messages, message indices grouped by exchange: user [+ answer])."""
  start = 1 if messages and messages[0]['role'] == 'system' else 0
  rest = list(range(start, len(messages)))
  return start, [rest[i : i + 2] for i in range(0, len(rest), 2)]


def _latest(messages: Sequence[Message], dropped: int) -> list[Message]:
  """The conversation without its `dropped` oldest exchanges (a system message stays)."""
  start, exchanges = _exchanges(messages)
  return [messages[i] for i in range(start)] + [
    messages[i] for ex in exchanges[dropped:] for i in ex
  ]


def chat_example(
  messages: Sequence[Message],
  tokenizer: Tokenizer,
  *,
  seq_len: int,
  loss_on: str = 'assistant',
  template: str = 'plain',
) -> ChatExample | None:
  """One conversation laid out in seq_len tokens, or None if its last exchange alone does not fit.

  The conversation must be valid (`validate_messages`) and end with an assistant turn, unless the
  loss is on the user turns (a query model may be taught the query a conversation ends with).
  """
  if loss_on not in LOSS_ON:
    raise ValueError(f'loss_on={loss_on!r}; allowed: {", ".join(LOSS_ON)}')
  validate_messages(messages, allow_trailing_user=loss_on == 'user')
  num_exchanges = len(_exchanges(messages)[1])
  for dropped in range(num_exchanges):
    ids, scored = sequences.chat_sequence(
      _latest(messages, dropped), tokenizer, template=template, loss_on=loss_on
    )
    if len(ids) <= seq_len:
      tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
      tokens[: len(ids)] = ids
      mask = np.zeros(seq_len, np.float32)
      mask[: len(ids)] = scored
      return ChatExample(tokens, mask, len(ids), dropped)
  return None


def encode_prompt(
  messages: Sequence[Message],
  tokenizer: Tokenizer,
  *,
  next_role: str,
  max_len: int,
  template: str = 'plain',
  allow_empty_answers: bool = False,
) -> tuple[np.ndarray, int] | None:
  """(ids of the conversation + the next turn's opening, dropped exchanges) to generate that turn.

  The oldest exchanges are dropped until the prompt has at most max_len ids; None when even the
  most recent exchange does not fit. `messages` may be empty (the first user turn);
  allow_empty_answers lets a model's own empty replies stand in the history.
  """
  if next_role not in ('user', 'assistant'):
    raise ValueError(f'next_role={next_role!r}; must be user or assistant')
  if messages:
    validate_messages(messages, allow_empty_answers=allow_empty_answers)
    expected = 'assistant' if messages[-1]['role'] == 'user' else 'user'
    if next_role != expected:
      raise ValueError(f'next turn must be {expected!r} after a {messages[-1]["role"]!r} turn')
  elif next_role != 'user':
    raise ValueError('an empty conversation continues with a user turn')
  opening = tokenizer.encode_array(turn_affixes(next_role, template)[0]).astype(np.int32)
  exchanges = len(_exchanges(messages)[1])
  for dropped in range(exchanges + 1):
    if dropped and dropped == exchanges and next_role == 'assistant':
      return None  # The pending user turn itself would go.
    history, _ = sequences.chat_sequence(_latest(messages, dropped), tokenizer, template=template)
    ids = np.concatenate([history, opening]).astype(np.int32)
    if len(ids) <= max_len:
      return ids, dropped
  return None


def answer_ids(tokenizer: Tokenizer, content: str, *, template: str = 'plain') -> np.ndarray:
  """An assistant turn after its opening: content + the template's turn ending + eos, so that
  `encode_prompt(..., next_role='assistant')` followed by these ids is exactly the layout of the
  conversation with this answer (how CaPO pairs and answer log-probs are scored)."""
  text = content + turn_affixes('assistant', template)[1]
  return np.append(tokenizer.encode_array(text), tokenizer.eos_id).astype(np.int32)


def stop_tokens(tokenizer: Tokenizer, role: str, template: str = 'plain') -> tuple[int, ...]:
  """The ids that end a generated `role` turn: eos for the assistant; for the user (no eos in the
  layout) the first token of the template's turn ending ('\\n' for 'plain'), so generated queries
  are single-line."""
  if role == 'assistant':
    return (tokenizer.eos_id,)
  ending = tokenizer.encode(turn_affixes(role, template)[1])
  if not ending:
    raise ValueError(f'chat template {template!r} ends a {role} turn with nothing to stop at')
  return (ending[0],)


def decode_chat(
  ids: Sequence[int], tokenizer: Tokenizer, *, template: str = 'plain'
) -> list[Message]:
  """The messages of `chat_example` / `encode_prompt` ids (padding, bos and eos ignored).

  A turn runs from a role's opening to the next opening that follows a turn ending; a trailing
  opening with nothing after it comes back as an empty turn. ValueError when the text does not
  start with a role's opening.
  """
  ids = np.asarray(ids).reshape(-1)
  text = tokenizer.decode(ids)
  affixes = {role: turn_affixes(role, template) for role in ROLES}
  messages, pos = [], 0
  while pos < len(text):
    role = next((r for r, (o, _) in affixes.items() if text.startswith(o, pos)), None)
    if role is None:
      raise ValueError(f'turn without a role opening at {text[pos : pos + 40]!r}')
    start = pos + len(affixes[role][0])
    ending = affixes[role][1]
    cuts = [text.find(ending + opening, start) for opening, _ in affixes.values()]
    end = min([c for c in cuts if c >= 0], default=len(text))
    messages.append({'role': role, 'content': text[start:end].removesuffix(ending)})
    pos = end + len(ending) if end < len(text) else len(text)
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


def chat_pair_example(record: dict, tokenizer, seq_len: int) -> tuple[dict | None, int]:
  """(pair example, exchanges dropped from the oldest) of a CaPO chat record in the `chat_capo`
  layout: history + query as the prompt, each answer (`answer_ids`) the scored completion;
  (None, 0) when even the query and the longer answer alone do not fit in seq_len."""
  sides = [answer_ids(tokenizer, record[side]) for side in ('chosen', 'rejected')]
  room = seq_len - max(len(side) for side in sides)
  prompt = encode_prompt(record['messages'], tokenizer, next_role='assistant', max_len=room)
  example = (
    None if prompt is None else sequences.pair_example(prompt[0], *sides, seq_len, tokenizer.pad_id)
  )
  return example, (0 if example is None else prompt[1])
