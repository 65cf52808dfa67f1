"""Multi-turn sessions over a program-tracked world, whose later turns need the history.

Every user turn is a small list operation; every assistant answer is the resulting list, computed
by `run_session`, so it is exact. A turn names what it works on either explicitly ("Sort 7 2 9.")
or through the history:

  kind              example                            needs
  explicit          Sort 7 2 9.                        nothing (context-independent)
  pronoun           Append 4 to it.                    the previous answer
  ordinal           Reverse the second answer.         an earlier answer
  ellipsis          Same for 5 1 8.                    the previous turn's operation
  again             Do that again.                     the previous operation and answer
  ellipsis_ordinal  Same for the first answer.         the previous operation and an earlier answer
  recall            What was the third answer?         an earlier answer

Answers are the numbers separated by spaces ('2 7 9'), or 'empty' for the empty list. Text and
structure convert both ways (`render_query` / `parse_query`), so generated text (e.g. from the
Parrot-Ask model) can be checked and answered by the same program.

Context errors (CaPO negatives) are the same program run against a corrupted view of the history:
`negative_answer(..., 'neglect')` answers with no history (missing lists are empty, a missing
operation changes nothing), 'hallucination' guesses the referent (a made-up list, a different
operation), 'misunderstanding' reads an irrelevant earlier turn instead of the right one.
"""

import dataclasses
import random
import re
from collections.abc import Callable, Mapping, Sequence

OPS = ('sort', 'reverse', 'append', 'remove', 'add')
KINDS = ('explicit', 'pronoun', 'ordinal', 'ellipsis', 'again', 'ellipsis_ordinal', 'recall')
NEGATIVE_KINDS = ('neglect', 'hallucination', 'misunderstanding')
SPLIT_SEEDS = {'train': 0, 'validation': 1, 'test': 2}
DEFAULT_SPLIT_SIZES = {'train': 5000, 'validation': 250, 'test': 250}
MIN_TURNS, MAX_TURNS = 8, 12
MAX_NUMBER = 99
MAX_ITEMS = 7
EMPTY = 'empty'

# Per kind: where the operand comes from ('items' | 'prev' | 'ref') and the operation ('own' |
# 'prev' | None for a plain recall).
_KIND_SOURCES = {
  'explicit': ('items', 'own'),
  'pronoun': ('prev', 'own'),
  'ordinal': ('ref', 'own'),
  'ellipsis': ('items', 'prev'),
  'again': ('prev', 'prev'),
  'ellipsis_ordinal': ('ref', 'prev'),
  'recall': ('ref', None),
}
# Generation weights of the kinds after turn 1 (about 40% context-dependent turns, as in Parrot-40K).
_KIND_WEIGHTS = {
  'explicit': 0.58,
  'pronoun': 0.12,
  'ordinal': 0.07,
  'ellipsis': 0.09,
  'again': 0.04,
  'ellipsis_ordinal': 0.05,
  'recall': 0.05,
}
_ORDINALS = (
  'first',
  'second',
  'third',
  'fourth',
  'fifth',
  'sixth',
  'seventh',
  'eighth',
  'ninth',
  'tenth',
  'eleventh',
  'twelfth',
)
_ORDINAL_OF = {word: i + 1 for i, word in enumerate(_ORDINALS)}
_LIST = r'(\d+(?: \d+)*)'
_TARGET = r'(it|the (\w+) answer|' + _LIST + ')'
_OP_PATTERNS = (
  ('sort', re.compile(rf'^Sort {_TARGET}\.$')),
  ('reverse', re.compile(rf'^Reverse {_TARGET}\.$')),
  ('append', re.compile(rf'^Append (\d+) to {_TARGET}\.$')),
  ('remove', re.compile(rf'^Remove the (\w+) number from {_TARGET}\.$')),
  ('add', re.compile(rf'^Add (\d+) to every number in {_TARGET}\.$')),
)
_SAME_RE = re.compile(rf'^Same for (the (\w+) answer|{_LIST})\.$')
_AGAIN_RE = re.compile(r'^Do that again\.$')
_RECALL_RE = re.compile(r'^What was the (\w+) answer\?$')


class InvalidQuery(ValueError):
  """A query the program cannot parse or answer in its context (bad text, missing referent)."""


@dataclasses.dataclass(frozen=True)
class Query:
  """One user turn as structure.

  op/arg: the operation and its number (append/add: the value; remove: the 1-based position; None
  for sort/reverse), both None when the operation is elided (ellipsis, again) or for a recall.
  items: the explicit operand; ref: the 1-based turn an ordinal reference points at.
  """

  kind: str
  op: str | None = None
  arg: int | None = None
  items: tuple[int, ...] | None = None
  ref: int | None = None


@dataclasses.dataclass(frozen=True)
class Turn:
  """A user query, its exact answer and its labels (dependencies are 1-based turn numbers)."""

  user: str
  assistant: str
  kind: str
  depends_on: tuple[int, ...]

  @property
  def context_dependent(self) -> bool:
    return bool(self.depends_on)


def format_list(items: Sequence[int]) -> str:
  return ' '.join(map(str, items)) if len(items) else EMPTY


def parse_list(text: str) -> tuple[int, ...]:
  """Inverse of `format_list`; InvalidQuery when the text is not a list answer."""
  text = text.strip()
  if text == EMPTY:
    return ()
  if not re.fullmatch(_LIST, text):
    raise InvalidQuery(f'not a list answer: {text!r}')
  return tuple(int(x) for x in text.split())


def _ordinal(word: str) -> int:
  if word not in _ORDINAL_OF:
    raise InvalidQuery(f'unknown ordinal {word!r}')
  return _ORDINAL_OF[word]


def _render_target(query: Query) -> str:
  source = _KIND_SOURCES[query.kind][0]
  if source == 'prev':
    return 'it'
  if source == 'ref':
    return f'the {_ORDINALS[query.ref - 1]} answer'
  return format_list(query.items)


def render_query(query: Query) -> str:
  """The user text of a query (inverse of `parse_query`)."""
  target = _render_target(query)
  if query.kind == 'recall':
    return f'What was {target}?'
  if query.kind == 'again':
    return 'Do that again.'
  if _KIND_SOURCES[query.kind][1] == 'prev':
    return f'Same for {target}.'
  if query.op == 'append':
    return f'Append {query.arg} to {target}.'
  if query.op == 'remove':
    return f'Remove the {_ORDINALS[query.arg - 1]} number from {target}.'
  if query.op == 'add':
    return f'Add {query.arg} to every number in {target}.'
  return f'{query.op.capitalize()} {target}.'


def _parse_target(whole: str, ordinal: str | None, items: str | None) -> tuple[str, dict]:
  """(operand source, Query fields) of a matched target phrase."""
  if whole == 'it':
    return 'prev', {}
  if ordinal is not None:
    return 'ref', {'ref': _ordinal(ordinal)}
  return 'items', {'items': parse_list(items)}


def parse_query(text: str) -> Query:
  """The structure of a user turn; InvalidQuery when the text is not one the program knows."""
  text = text.strip()
  if _AGAIN_RE.match(text):
    return Query('again')
  if match := _RECALL_RE.match(text):
    return Query('recall', ref=_ordinal(match.group(1)))
  if match := _SAME_RE.match(text):
    source, fields = _parse_target(match.group(1), match.group(2), match.group(3))
    return Query('ellipsis' if source == 'items' else 'ellipsis_ordinal', **fields)
  for op, pattern in _OP_PATTERNS:
    if match := pattern.match(text):
      groups = match.groups()
      arg = None
      if op in ('append', 'add'):
        arg, groups = int(groups[0]), groups[1:]
      elif op == 'remove':
        arg, groups = _ordinal(groups[0]), groups[1:]
      source, fields = _parse_target(*groups)
      kind = {'items': 'explicit', 'prev': 'pronoun', 'ref': 'ordinal'}[source]
      return Query(kind, op=op, arg=arg, **fields)
  raise InvalidQuery(f'not a query the program knows: {text!r}')


def dependencies(query: Query, turn: int) -> tuple[int, ...]:
  """The earlier turns (1-based) that `query`, asked at 1-based `turn`, needs."""
  source, op_source = _KIND_SOURCES[query.kind]
  deps = set()
  if source == 'prev' or op_source == 'prev':
    deps.add(turn - 1)
  if source == 'ref':
    deps.add(query.ref)
  return tuple(sorted(deps))


def apply_op(op: str, arg: int | None, items: Sequence[int]) -> tuple[int, ...]:
  """One list operation; 'identity' returns the list unchanged (the neglect view of an ellipsis)."""
  items = tuple(items)
  if op in ('sort', 'reverse', 'identity'):
    return {'sort': tuple(sorted(items)), 'reverse': items[::-1], 'identity': items}[op]
  if op == 'append':
    return (*items, arg)
  if op == 'add':
    return tuple(x + arg for x in items)
  if op == 'remove':
    if not items:
      return ()
    if not 1 <= arg <= len(items):
      raise InvalidQuery(f'cannot remove number {arg} of a list of {len(items)}')
    return items[: arg - 1] + items[arg:]
  raise InvalidQuery(f'unknown operation {op!r}')


# A view of the history: answer(j) is the list answered at turn j, operation(j) the (op, arg) used
# there (None for a recall). Both raise InvalidQuery when turn j does not exist.
Lookup = Callable[[int], tuple]


def answer_with(query: Query, turn: int, answer: Lookup, operation: Lookup) -> tuple[int, ...]:
  """The answer to `query` at 1-based `turn`, reading the history only through the lookups."""
  source, op_source = _KIND_SOURCES[query.kind]
  if source == 'items':
    items = query.items
  else:
    items = answer(turn - 1 if source == 'prev' else query.ref)
  if op_source is None:
    return tuple(items)
  if op_source == 'own':
    op, arg = query.op, query.arg
  else:
    previous = operation(turn - 1)
    if previous is None:
      raise InvalidQuery(f'turn {turn - 1} has no operation to repeat')
    op, arg = previous
  return apply_op(op, arg, items)


@dataclasses.dataclass
class History:
  """The answers, effective operations and query kinds of the turns so far (index 0 = turn 1)."""

  answers: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
  operations: list[tuple[str, int | None] | None] = dataclasses.field(default_factory=list)
  kinds: list[str] = dataclasses.field(default_factory=list)

  def _check(self, j: int) -> int:
    if not 1 <= j <= len(self.answers):
      raise InvalidQuery(f'turn {j} does not exist (history has {len(self.answers)} turns)')
    return j - 1

  def answer(self, j: int) -> tuple[int, ...]:
    return self.answers[self._check(j)]

  def operation(self, j: int) -> tuple[str, int | None] | None:
    return self.operations[self._check(j)]

  def add(self, query: Query, answer: tuple[int, ...]) -> None:
    """Records a turn; an elided operation is stored as the one it resolved to."""
    op_source = _KIND_SOURCES[query.kind][1]
    if op_source is None:
      operation = None
    elif op_source == 'own':
      operation = (query.op, query.arg)
    else:
      operation = self.operation(len(self.answers))
    self.answers.append(tuple(answer))
    self.operations.append(operation)
    self.kinds.append(query.kind)


def answer_query(query: Query, history: History) -> tuple[int, ...]:
  """The exact answer to `query` asked after the turns in `history`."""
  return answer_with(query, len(history.answers) + 1, history.answer, history.operation)


def run_session(user_turns: Sequence[str]) -> list[Turn]:
  """Parses and answers a whole session; InvalidQuery at the first turn it cannot handle."""
  history = History()
  turns = []
  for number, text in enumerate(user_turns, 1):
    query = parse_query(text)
    answer = answer_query(query, history)
    turns.append(Turn(text.strip(), format_list(answer), query.kind, dependencies(query, number)))
    history.add(query, answer)
  return turns


def _random_items(rng: random.Random, low: int = 2, high: int = 5) -> tuple[int, ...]:
  return tuple(rng.randint(0, 9) for _ in range(rng.randint(low, high)))


def _random_operation(rng: random.Random, items: Sequence[int]) -> tuple[str, int | None] | None:
  """An operation that keeps the list non-empty, short and within MAX_NUMBER, or None."""
  ops = ['sort', 'reverse']
  if len(items) < MAX_ITEMS:
    ops.append('append')
  if len(items) >= 3:
    ops.append('remove')
  if items and max(items) <= MAX_NUMBER - 9:
    ops.append('add')
  op = rng.choice(ops)
  arg = {'append': rng.randint(0, 9), 'add': rng.randint(1, 9)}.get(op)
  if op == 'remove':
    arg = rng.randint(1, len(items))
  return op, arg


def _fits(op: str, arg: int | None, items: Sequence[int]) -> bool:
  """Whether a repeated operation keeps the data inside the generator's ranges."""
  if op == 'append':
    return len(items) < MAX_ITEMS
  if op == 'remove':
    return len(items) >= 3 and arg <= len(items)
  if op == 'add':
    return bool(items) and max(items) + arg <= MAX_NUMBER
  return True


def _propose(rng: random.Random, turn: int, history: History) -> Query | None:
  """A random query for 1-based `turn`, or None when the drawn kind does not fit the history."""
  kind = 'explicit'
  if turn > 1:
    kind = rng.choices(list(_KIND_WEIGHTS), weights=list(_KIND_WEIGHTS.values()))[0]
  source, op_source = _KIND_SOURCES[kind]
  fields = {}
  if source == 'items':
    items = _random_items(rng)
    fields['items'] = items
  elif source == 'prev':
    items = history.answer(turn - 1)
  else:
    if turn < 3:
      return None  # An ordinal should point before the previous turn ('it' covers that one).
    fields['ref'] = rng.randint(1, turn - 2)
    items = history.answer(fields['ref'])
  if op_source == 'own':
    fields['op'], fields['arg'] = _random_operation(rng, items)
  elif op_source == 'prev':
    previous = history.operation(turn - 1)
    # Repeat only an operation the previous turn states itself (keeps the labels one level deep).
    if previous is None or _KIND_SOURCES[history.kinds[-1]][1] != 'own':
      return None
    if not _fits(*previous, items):
      return None
  return Query(kind, **fields)


def generate_session(seed: int, index: int, num_turns: int | None = None) -> list[Turn]:
  """The session for (seed, index): MIN_TURNS..MAX_TURNS turns, identical on every machine."""
  rng = random.Random(f'kj_dialog/{seed}/{index}')
  if num_turns is None:
    num_turns = rng.randint(MIN_TURNS, MAX_TURNS)
  history = History()
  turns = []
  for number in range(1, num_turns + 1):
    query = None
    while query is None:
      query = _propose(rng, number, history)
    answer = answer_query(query, history)
    turns.append(
      Turn(render_query(query), format_list(answer), query.kind, dependencies(query, number))
    )
    history.add(query, answer)
  return turns


def generate_splits(
  sizes: Mapping[str, int] = DEFAULT_SPLIT_SIZES,
) -> dict[str, list[tuple[int, list[Turn]]]]:
  """Sessions per split as (id, turns), unique within and across splits (id = seed * 10**9 + index).

  Splits come in the order of `sizes`, each from its own seed in `SPLIT_SEEDS`; a session whose
  user turns were already taken is skipped, so splits are disjoint.
  """
  seen: set[tuple[str, ...]] = set()
  splits = {}
  for split, size in sizes.items():
    seed = SPLIT_SEEDS[split]
    sessions = []
    index = 0
    while len(sessions) < size:
      turns = generate_session(seed, index)
      key = tuple(t.user for t in turns)
      if key not in seen:
        seen.add(key)
        sessions.append((seed * 10**9 + index, turns))
      index += 1
    splits[split] = sessions
  return splits


def _guessed_operation(rng: random.Random, true: tuple[str, int | None] | None):
  """A plausible operation other than `true` (no 'remove', which may not fit a guessed list)."""
  while True:
    op = rng.choice(('sort', 'reverse', 'append', 'add'))
    guess = (op, {'append': rng.randint(0, 9), 'add': rng.randint(1, 9)}.get(op))
    if guess != true:
      return guess


def negative_answer(query: Query, history: History, kind: str, rng: random.Random) -> str | None:
  """The answer to a context-dependent `query` under one context error, or None if none differs.

  neglect: no history at all (a missing list is empty, a missing operation is the identity);
  hallucination: every referent guessed (a made-up list, another operation);
  misunderstanding: the referent read from another earlier turn, one the query does not depend on.
  The returned answer always differs from the correct one.
  """
  turn = len(history.answers) + 1
  deps = dependencies(query, turn)
  if not deps:
    raise ValueError(f'turn {turn} ({query.kind}) does not depend on the history: no negatives')
  correct = answer_query(query, history)
  if kind == 'neglect':
    views = [(lambda j: (), lambda j: ('identity', None))]
  elif kind == 'hallucination':
    guess_list = lambda j: _random_items(rng)
    guess_op = lambda j: _guessed_operation(rng, history.operation(j))
    views = [(guess_list, guess_op)] * 8
  elif kind == 'misunderstanding':
    others = [j for j in range(1, turn) if j not in deps]
    rng.shuffle(others)
    views = [
      (lambda _, k=k: history.answer(k), lambda _, k=k: history.operation(k)) for k in others
    ]
  else:
    raise ValueError(f'unknown negative kind {kind!r}; allowed: {", ".join(NEGATIVE_KINDS)}')
  for answer, operation in views:
    try:
      wrong = answer_with(query, turn, answer, operation)
    except InvalidQuery:
      continue
    if wrong != correct:
      return format_list(wrong)
  return None


def session_negatives(user_turns: Sequence[str], turn: int) -> dict[str, str | None]:
  """The three negatives of 1-based `turn` of a session, deterministic in the session's text."""
  history = History()
  queries = [parse_query(text) for text in user_turns[:turn]]
  for query in queries[:-1]:
    history.add(query, answer_query(query, history))
  key = '|'.join(t.strip() for t in user_turns[:turn])
  return {
    kind: negative_answer(queries[-1], history, kind, random.Random(f'kj_dialog/{kind}/{key}'))
    for kind in NEGATIVE_KINDS
  }


def capo_pairs(
  sessions: Sequence[Sequence[Turn]], kinds: Sequence[str] = NEGATIVE_KINDS
) -> tuple[list[dict], dict[str, int]]:
  """CaPO preference records for every context-dependent turn and negative kind.

  Each record: 'messages' (the gold history and the query, ending with the user turn), 'chosen'
  (the exact answer), 'rejected' (the answer under the context error), 'negative' (its kind) and
  'turn' (1-based). Returns the records and, per kind, how many turns had no differing negative.
  """
  bad = sorted(set(kinds) - set(NEGATIVE_KINDS))
  if bad or not kinds:
    raise ValueError(f'negative kinds {list(kinds)} must be a non-empty subset of {NEGATIVE_KINDS}')
  records, missing = [], dict.fromkeys(kinds, 0)
  for session in sessions:
    users = [t.user for t in session]
    for k, turn in enumerate(session, 1):
      if not turn.context_dependent:
        continue
      negatives = session_negatives(users, k)
      history = [
        {'role': role, 'content': text}
        for t in session[: k - 1]
        for role, text in (('user', t.user), ('assistant', t.assistant))
      ]
      messages = [*history, {'role': 'user', 'content': turn.user}]
      for kind in kinds:
        if negatives[kind] is None:
          missing[kind] += 1
          continue
        records.append(
          {
            'messages': messages,
            'chosen': turn.assistant,
            'rejected': negatives[kind],
            'negative': kind,
            'turn': k,
          }
        )
  return records, missing


def oracle_sessions(
  asker: Callable[[list[list[dict]]], list[str]],
  openings: Sequence[Sequence[str]],
  *,
  num_turns: int,
) -> tuple[list[list[Turn]], dict[str, float]]:
  """Sessions continued by a query model (`asker`) and answered by the program, Parrot-Ask style.

  Each session starts with the user turns of one opening (e.g. the first turn of a real session,
  as Parrot-Ask continues real first questions) and is continued until num_turns turns: asker maps
  the conversations (each ending with an assistant turn) to the next user turns. A generated query
  the program cannot parse or answer in its session ends that session there. Returns the sessions
  and statistics: generated queries, the fraction well-formed, the fraction of well-formed ones
  that depend on the context, and the mean turns and context-dependent turns per session.
  """
  users = [list(opening) for opening in openings]
  turns = [run_session(u) for u in users]
  active = [i for i, t in enumerate(turns) if len(t) < num_turns]
  asked = malformed = dependent_asked = 0
  while active:
    conversations = [
      [
        {'role': role, 'content': text}
        for t in turns[i]
        for role, text in (('user', t.user), ('assistant', t.assistant))
      ]
      for i in active
    ]
    queries = asker(conversations)
    asked += len(active)
    still = []
    for i, query in zip(active, queries, strict=True):
      try:
        turns[i] = run_session([*users[i], query])
      except InvalidQuery:
        malformed += 1
        continue
      users[i].append(query)
      dependent_asked += turns[i][-1].context_dependent
      if len(turns[i]) < num_turns:
        still.append(i)
    active = still
  well_formed = asked - malformed
  stats = {
    'queries': asked,
    'well_formed': well_formed / max(asked, 1),
    'context_dependent': dependent_asked / max(well_formed, 1),
    'turns_per_session': sum(map(len, turns)) / max(len(turns), 1),
    'context_dependent_per_session': sum(t.context_dependent for s in turns for t in s)
    / max(len(turns), 1),
    'sessions': len(turns),
  }
  return turns, stats
