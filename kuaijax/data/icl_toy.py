"""A toy family of in-context tasks where the demonstrations carry the answer: hidden lookup tables.

A task maps `num_keys` random one-letter keys (A-Z) to labels (a label set per data set), and
draws keys from a Zipf distribution: a few keys are frequent, most are rare. An example is one line
`Klabel`: the key letter then its label, nothing between, and no key letter occurs in a label (the
label words are lowercase). A model cannot know a task's table in advance: it answers a query (a line
holding only the key) from the
demonstrations in its prompt (copy the label of a demonstration with the same key), else it can only
guess. So accuracy measures how much of the test distribution the chosen demonstrations cover, and
demonstration selection matters: k random demonstrations repeat the frequent keys and miss others.

- `LOOKUP_SETS`: the evaluation "data sets" (label words, number of keys, Zipf exponent);
- `lookup_task` / `draw_examples`: a task's table and examples (optionally with label noise);
- `meta_training_texts`: rows of many fresh tasks, each a run of `key -> label` lines, for training
  a model to read a table in context (every label after the first occurrence of its key is
  predictable from the context: a one-token key directly before its label makes this the plain
  induction-head copy, find the earlier occurrence of the current token and copy what followed;
  a separator between key and label, `key:label`, would need one more composition);
- `icl_prompt`: k demonstrations then the query (any records with `prompt` and `completion`).
"""

from __future__ import annotations

import dataclasses
import random
import string

KEY_ALPHABET = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class LookupSet:
  """An evaluation data set: label words (distinct first letters), keys per task, Zipf exponent."""

  labels: tuple[str, ...]
  num_keys: int
  zipf: float


LOOKUP_SETS = {
  'colors': LookupSet(('red', 'blue', 'green', 'gold', 'pink'), num_keys=24, zipf=1.0),
  'yes_no': LookupSet(('yes', 'no'), num_keys=24, zipf=1.0),
  'digits': LookupSet(tuple('0123456789'), num_keys=24, zipf=0.8),
}


@dataclasses.dataclass(frozen=True)
class LookupTask:
  """A table key -> label and the key distribution (`weights`, summing to 1)."""

  keys: tuple[str, ...]
  labels: tuple[str, ...]
  weights: tuple[float, ...]


def lookup_task(rng: random.Random, spec: LookupSet) -> LookupTask:
  """A fresh task: random keys, a random label per key, Zipf weights over a random key order."""
  if not 1 <= spec.num_keys <= len(KEY_ALPHABET) or not spec.labels:
    raise ValueError(f'a lookup task needs 1..{len(KEY_ALPHABET)} keys and labels, got {spec}')
  if any(c in KEY_ALPHABET for label in spec.labels for c in label):
    raise ValueError(f'labels must not contain key letters ({KEY_ALPHABET}), got {spec.labels}')
  keys = rng.sample(KEY_ALPHABET, spec.num_keys)  # in rank order of the Zipf weights
  raw = [1.0 / (rank + 1) ** spec.zipf for rank in range(len(keys))]
  total = sum(raw)
  return LookupTask(
    keys=tuple(keys),
    labels=tuple(rng.choice(spec.labels) for _ in keys),
    weights=tuple(w / total for w in raw),
  )


def draw_examples(
  task: LookupTask, n: int, rng: random.Random, *, label_words=(), noise: float = 0.0
) -> list[dict]:
  """n examples {key, label, clean} with keys drawn by the task's weights; with probability `noise`
  the label is replaced by another word of `label_words` (clean=False)."""
  if not 0.0 <= noise < 1.0:
    raise ValueError(f'noise must be in [0, 1), got {noise}')
  if noise and len(label_words) < 2:
    raise ValueError('label noise needs at least two label_words')
  index = rng.choices(range(len(task.keys)), weights=task.weights, k=n)
  out = []
  for i in index:
    label, clean = task.labels[i], True
    if noise and rng.random() < noise:
      label, clean = rng.choice([w for w in label_words if w != label]), False
    out.append({'key': task.keys[i], 'label': label, 'clean': clean})
  return out


def line(key: str, label: str) -> str:
  return f'{key}{label}'


def query(key: str) -> str:
  """The prompt line of a query; the label follows."""
  return key


def icl_prompt(demonstrations: list[dict], query_prompt: str) -> str:
  """k demonstrations (their `prompt` + `completion`, one per line), then the query's prompt."""
  return ''.join(d['prompt'] + d['completion'] + '\n' for d in demonstrations) + query_prompt


def meta_training_texts(
  rng: random.Random, rows: int, *, lines: int, min_keys: int = 4, repeat_share: float = 0.5
) -> list[str]:
  """`rows` texts of `lines` examples each, every row a fresh task of a random data set kind (the
  labels and Zipf exponent of one of `LOOKUP_SETS`, new keys and table) with between `min_keys`
  and that set's number of keys: rows with few keys repeat them often, a dense signal for learning
  to copy a label from an earlier line with the same key. A share `repeat_share` of the rows is a
  block of lines written twice in the same order: in the second copy every token follows from the
  first by the same copy, which teaches it far sooner than the labels alone (one token in five)."""
  if not 0.0 <= repeat_share <= 1.0:
    raise ValueError(f'repeat_share must be in [0, 1], got {repeat_share}')
  specs = list(LOOKUP_SETS.values())
  texts = []
  for _ in range(rows):
    spec = rng.choice(specs)
    num_keys = rng.randint(min(min_keys, spec.num_keys), spec.num_keys)
    task = lookup_task(rng, dataclasses.replace(spec, num_keys=num_keys))
    if rng.random() < repeat_share:
      examples = draw_examples(task, lines // 2, rng)
      examples = examples + examples
    else:
      examples = draw_examples(task, lines, rng)
    texts.append('\n'.join(line(e['key'], e['label']) for e in examples))
  return texts
