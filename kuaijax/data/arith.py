"""Multi-step arithmetic word problems with numbered, machine-checkable solution steps.

Problems are generated deterministically from (seed, index, level), so data sets, RL prompts and
evaluations can be regenerated anywhere without files. Gold solutions use one step per line:

  [1] 4*5=20
  [2] 20-3=17
  The answer is 17

which `parse_steps` / `format_steps` read and write, so RLMEC / GRPO / self-consistency code can edit
single steps and `verify_steps` can locate the first wrong one. Only + - * appear, and every
intermediate result is a non-negative integer.
"""

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence

LEVELS = (1, 2, 3, 4)
SPLIT_SEEDS = {'train': 0, 'validation': 1, 'test': 2}
DEFAULT_SPLIT_SIZES = {'train': 20000, 'validation': 1000, 'test': 1000}

# Per level: (min steps, max steps, largest plain operand, largest multiplier).
_LEVEL_SPECS = {1: (1, 2, 10, 5), 2: (2, 3, 20, 6), 3: (3, 4, 50, 9), 4: (4, 6, 100, 12)}

_NAMES = (
  'Tom',
  'Mia',
  'Ana',
  'Ravi',
  'Wei',
  'Sara',
  'Omar',
  'Yuki',
  'Ben',
  'Zoe',
  'Kofi',
  'Ines',
  'Max',
  'Lena',
  'Hugo',
  'Priya',
  'Nora',
)
_OBJECTS = (
  'apples',
  'marbles',
  'stickers',
  'pencils',
  'cookies',
  'stamps',
  'cards',
  'shells',
  'beads',
  'coins',
  'eggs',
  'books',
  'balloons',
  'candles',
  'buttons',
)
_CONTAINERS = ('boxes', 'bags', 'packs', 'crates', 'baskets', 'jars', 'trays')

_ANSWER_RE = re.compile(r'The answer is\s*(-?\d[\d,]*)')
_STEP_RE = re.compile(r'^\s*\[(\d+)\]\s*(.*?)\s*=\s*(-?\d+)\s*$')
_TOKEN_RE = re.compile(r'\s*(?:(\d+)|(.))')


@dataclasses.dataclass(frozen=True)
class ArithProblem:
  """One word problem: question text, gold step-by-step solution, integer answer."""

  question: str
  solution: str
  answer: int
  level: int
  steps: int


@dataclasses.dataclass(frozen=True)
class Step:
  """One solution line; `expression`/`result` are None when the line does not parse."""

  index: int | None
  expression: str | None
  result: int | None
  raw: str

  @property
  def parsed(self) -> bool:
    return self.expression is not None


def _eval_tokens(tokens: list[tuple[str, str]]) -> int:
  """Recursive-descent evaluation of + - * and parentheses over integer tokens."""
  pos = 0

  def peek() -> str | None:
    return tokens[pos][1] if pos < len(tokens) else None

  def factor() -> int:
    nonlocal pos
    if pos >= len(tokens):
      raise ValueError('unexpected end of expression')
    number, op = tokens[pos]
    pos += 1
    if number:
      return int(number)
    if op == '-':
      return -factor()
    if op == '(':
      value = expr()
      if peek() != ')':
        raise ValueError('missing )')
      pos += 1
      return value
    raise ValueError(f'unexpected {op!r}')

  def term() -> int:
    nonlocal pos
    value = factor()
    while peek() == '*':
      pos += 1
      value *= factor()
    return value

  def expr() -> int:
    nonlocal pos
    value = term()
    while peek() in ('+', '-'):
      op = peek()
      pos += 1
      value = value + term() if op == '+' else value - term()
    return value

  value = expr()
  if pos != len(tokens):
    raise ValueError(f'trailing {tokens[pos]}')
  return value


def evaluate(expression: str) -> int:
  """Evaluates an integer expression with + - * and parentheses (no eval); ValueError if invalid."""
  tokens = [(m.group(1) or '', m.group(2) or '') for m in _TOKEN_RE.finditer(expression.strip())]
  if any(op and op not in '+-*()' for _, op in tokens):
    raise ValueError(f'unsupported character in {expression!r}')
  try:
    return _eval_tokens(tokens)
  except RecursionError as e:
    raise ValueError(f'expression nested too deeply: {expression[:50]!r}...') from e


def parse_steps(solution_text: str) -> list[Step]:
  """Splits a solution into steps; other non-empty lines (except the answer line) come back unparsed."""
  steps = []
  for line in solution_text.splitlines():
    if not line.strip() or _ANSWER_RE.search(line):
      continue
    match = _STEP_RE.match(line)
    if match:
      steps.append(Step(int(match.group(1)), match.group(2), int(match.group(3)), line))
    else:
      index = re.match(r'^\s*\[(\d+)\]', line)
      steps.append(Step(int(index.group(1)) if index else None, None, None, line))
  return steps


def format_steps(steps: Sequence[Step], answer: int) -> str:
  """Serialises steps plus the answer line; parsed steps are renumbered 1..n, others kept raw."""
  lines = []
  number = 0
  for step in steps:
    if step.parsed:
      number += 1
      lines.append(f'[{number}] {step.expression}={step.result}')
    else:
      lines.append(step.raw)
  lines.append(f'The answer is {answer}')
  return '\n'.join(lines)


def extract_answer(text: str) -> int | None:
  """The integer after the last 'The answer is', or None if there is none."""
  matches = _ANSWER_RE.findall(text)
  return int(matches[-1].replace(',', '')) if matches else None


def check_answer(text: str, gold: int) -> bool:
  return extract_answer(text) == gold


def verify_steps(steps: Sequence[Step]) -> int | None:
  """List position (0-based) of the first step that is unparsed or whose arithmetic is wrong.

  Each step is checked on its own (expression vs stated result); whether it uses the right numbers
  from earlier steps is not checked. Returns None when every step is correct.
  """
  for position, step in enumerate(steps):
    if not step.parsed:
      return position
    try:
      if evaluate(step.expression) != step.result:
        return position
    except ValueError:
      return position
  return None


def format_prompt(question: str) -> str:
  """The model input for a question; the gold solution text follows it directly."""
  return f'Question: {question}\nSolution:\n'


def _generate(rng: random.Random, level: int) -> tuple[str, list[tuple[str, int]], int]:
  """Builds one story as (question, [(expression, result)], answer)."""
  min_steps, max_steps, big, mult = _LEVEL_SPECS[level]
  target = rng.randint(min_steps, max_steps)
  name = rng.choice(_NAMES)
  obj = rng.choice(_OBJECTS)
  container = rng.choice(_CONTAINERS)
  steps: list[tuple[str, int]] = []
  if target >= 2 or rng.random() < 0.5:
    a, b = rng.randint(2, mult), rng.randint(2, big)
    value = a * b
    steps.append((f'{a}*{b}', value))
    sentences = [
      rng.choice(
        (
          f'{name} has {a} {container} of {b} {obj}.',
          f'{name} buys {a} {container} with {b} {obj} in each.',
        )
      )
    ]
  else:
    value = rng.randint(big // 2 + 1, 2 * big)
    sentences = [f'{name} has {value} {obj}.']
  last = 'has'
  while len(steps) < target:
    room = target - len(steps)
    kind = rng.choice(
      ('add', 'sub', 'mul', 'add_groups', 'sub_groups') if room >= 2 else ('add', 'sub', 'mul')
    )
    if kind == 'sub' and value < 2:
      kind = 'add'
    if kind == 'mul' and value > 20 * big:
      kind = 'sub'
    if kind == 'add':
      k = rng.randint(1, big)
      sentences.append(
        rng.choice(
          (
            f'Then {name} finds {k} more.',
            f'A friend gives {name} {k} more {obj}.',
            f'{name} gets {k} more {obj}.',
          )
        )
      )
      steps.append((f'{value}+{k}', value + k))
      value += k
      last = 'has'
    elif kind == 'sub':
      k = rng.randint(1, min(value - 1, big))
      sentences.append(
        rng.choice(
          (f'{name} gives away {k}.', f'{name} loses {k} of them.', f'{name} uses {k} of them.')
        )
      )
      steps.append((f'{value}-{k}', value - k))
      value -= k
      last = 'left'
    elif kind == 'mul':
      k = rng.randint(2, min(mult, 4))
      word = {2: 'doubles', 3: 'triples', 4: 'quadruples'}[k]
      sentences.append(
        rng.choice((f'Then {name} {word} the collection.', f'The number of {obj} {word}.'))
      )
      steps.append((f'{value}*{k}', value * k))
      value *= k
      last = 'has'
    elif kind == 'add_groups':
      k, m = rng.randint(2, mult), rng.randint(2, big)
      sentences.append(f'{name} buys {k} more {container} of {m} {obj}.')
      steps += [(f'{k}*{m}', k * m), (f'{value}+{k * m}', value + k * m)]
      value += k * m
      last = 'has'
    else:
      k = rng.randint(2, mult)
      if value // k < 1:
        continue
      m = rng.randint(1, max(1, min(big, (value - 1) // k)))
      if k * m >= value:
        continue
      sentences.append(f'{name} gives {k} friends {m} {obj} each.')
      steps += [(f'{k}*{m}', k * m), (f'{value}-{k * m}', value - k * m)]
      value -= k * m
      last = 'left'
  if last == 'left':
    sentences.append(
      rng.choice((f'How many {obj} are left?', f'How many {obj} does {name} have left?'))
    )
  else:
    sentences.append(
      rng.choice((f'How many {obj} does {name} have now?', f'How many {obj} are there in the end?'))
    )
  return ' '.join(sentences), steps, value


def generate_problem(seed: int, index: int, level: int) -> ArithProblem:
  """The problem for (seed, index, level); identical on every machine and Python run."""
  if level not in LEVELS:
    raise ValueError(f'level must be one of {LEVELS}, got {level}')
  rng = random.Random(f'kj_arith/{seed}/{index}/{level}')
  question, steps, answer = _generate(rng, level)
  solution = format_steps([Step(i + 1, e, r, '') for i, (e, r) in enumerate(steps)], answer)
  return ArithProblem(question, solution, answer, level, len(steps))


def generate_splits(
  sizes: Mapping[str, int] = DEFAULT_SPLIT_SIZES,
) -> dict[str, list[tuple[int, ArithProblem]]]:
  """Problems per split as (id, problem); questions are unique across and within splits.

  Splits are produced in the order of `sizes` (train first), each from its own seed in
  `SPLIT_SEEDS`, cycling levels 1..4 over the index; a question already taken is skipped, so
  later splits never repeat earlier ones. The id encodes (seed, index): seed * 10**9 + index.
  """
  seen: set[str] = set()
  splits = {}
  for split, size in sizes.items():
    seed = SPLIT_SEEDS[split]
    problems = []
    index = 0
    while len(problems) < size:
      problem = generate_problem(seed, index, LEVELS[index % len(LEVELS)])
      if problem.question not in seen:
        seen.add(problem.question)
        problems.append((seed * 10**9 + index, problem))
      index += 1
    splits[split] = problems
  return splits


def problem_record(problem: ArithProblem) -> dict:
  """A problem as a task record: its fields plus the generic `prompt` / `completion` texts."""
  return {
    **dataclasses.asdict(problem),
    'prompt': format_prompt(problem.question),
    'completion': problem.solution,
  }


def record_problem(record: Mapping) -> ArithProblem:
  """The problem of a task record (the inverse of `problem_record`)."""
  return ArithProblem(
    str(record['question']),
    str(record['solution']),
    int(record['answer']),
    int(record['level']),
    int(record['steps']),
  )
