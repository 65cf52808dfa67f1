"""tfds builder `kj_lm_mixture`: an LM corpus with a task tag per example.

Tasks (ClassLabel `task`, in this order): 'code' = chunks of the running Python's own standard
library sources (real text nobody here wrote); 'arith' = `kj_arith` problems as prompt + solution
(the same problems and splits, so no kj_arith eval problem is in this train split); 'copy' =
`copy: <s> | <s>`; 'recall' = key=value pairs then `query k -> v`. Used to measure per-task
behaviour such as Top-P MoE experts per token.

The 'code' task depends on the Python version that builds the data set: `sys.version` is stored in
the builder metadata (`info.metadata['python_version']`) along with per-split task counts.
"""

import hashlib
import pathlib
import random
import string
import sys
import sysconfig

import tensorflow_datasets as tfds

from kuaijax.data import arith

TASKS = ('code', 'arith', 'copy', 'recall')
SPLITS = ('train', 'validation', 'test')

# Characters of stdlib source per split (a few MB in total keeps the build well under 30 s).
CODE_CHARS = {'train': 3_200_000, 'validation': 400_000, 'test': 400_000}
SYNTHETIC_SIZES = {'train': 10_000, 'validation': 500, 'test': 500}
MIN_CHUNK_CHARS = 1000
# Directories of the stdlib that are tests, GUIs, vendored wheels or generated tables.
SKIP_DIRS = frozenset(
  {
    'test',
    'tests',
    'idlelib',
    'turtledemo',
    'site-packages',
    'dist-packages',
    '__pycache__',
    'ensurepip',
    'encodings',
    'pydoc_data',
  }
)


def _hash(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], 'little')


def code_split(relative_path: str) -> str:
  """The split of a stdlib file, from a hash of its path (10% validation, 10% test)."""
  bucket = _hash(relative_path) % 10
  return 'validation' if bucket == 0 else 'test' if bucket == 1 else 'train'


def stdlib_files(stdlib_dir: str | None = None) -> list[tuple[str, pathlib.Path]]:
  """(relative path, path) of the stdlib's .py files outside SKIP_DIRS, sorted by path."""
  root = pathlib.Path(stdlib_dir or sysconfig.get_paths()['stdlib'])
  files = []
  for path in sorted(root.rglob('*.py')):
    relative = path.relative_to(root).as_posix()
    if not SKIP_DIRS.intersection(relative.split('/')[:-1]) and path.is_file():
      files.append((relative, path))
  return files


def chunk_lines(text: str, min_chars: int = MIN_CHUNK_CHARS) -> list[str]:
  """Splits text on line boundaries into chunks of at least min_chars.

  A short file is one chunk; a tail shorter than min_chars / 4 joins the chunk before it.
  """
  chunks, current, size = [], [], 0
  for line in text.splitlines(keepends=True):
    current.append(line)
    size += len(line)
    if size >= min_chars:
      chunks.append(''.join(current))
      current, size = [], 0
  tail = ''.join(current)
  if chunks and len(tail) < min_chars // 4:
    chunks[-1] += tail
  elif tail.strip():
    chunks.append(tail)
  return chunks


def code_examples(code_chars=CODE_CHARS, stdlib_dir: str | None = None) -> dict[str, list[str]]:
  """Stdlib chunks per split: files go to splits by path hash, in a hashed order, up to the caps."""
  files = sorted(stdlib_files(stdlib_dir), key=lambda f: _hash('order/' + f[0]))
  chunks = {split: [] for split in code_chars}
  sizes = dict.fromkeys(code_chars, 0)
  for relative, path in files:
    split = code_split(relative)
    if sizes[split] >= code_chars[split]:
      continue
    try:
      text = path.read_text(encoding='utf-8')
    except UnicodeDecodeError:
      continue
    for chunk in chunk_lines(text):
      chunks[split].append(chunk)
      sizes[split] += len(chunk)
  return chunks


def copy_text(rng: random.Random) -> str:
  s = ''.join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(4, 32)))
  return f'copy: {s} | {s}'


def recall_text(rng: random.Random) -> str:
  keys = rng.sample(
    [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase], rng.randint(2, 8)
  )
  values = {k: rng.randint(0, 999) for k in keys}
  query = rng.choice(keys)
  pairs = ', '.join(f'{k}={v}' for k, v in values.items())
  return f'recall: {pairs}. query {query} -> {values[query]}'


def mixture_examples() -> dict[str, list[tuple[str, str]]]:
  """(task, text) examples per split, in generation order."""
  code = code_examples()
  problems = arith.generate_splits(arith.DEFAULT_SPLIT_SIZES)
  examples = {}
  for split in SPLITS:
    seed = arith.SPLIT_SEEDS[split]
    rows = [('code', text) for text in code[split]]
    rows += [('arith', arith.format_prompt(p.question) + p.solution) for _, p in problems[split]]
    for task, make in (('copy', copy_text), ('recall', recall_text)):
      rows += [
        (task, make(random.Random(f'{task}/{seed}/{i}'))) for i in range(SYNTHETIC_SIZES[split])
      ]
    examples[split] = rows
  return examples


class KjLmMixture(tfds.core.GeneratorBasedBuilder):
  """Task-tagged LM mixture; the 'code' task depends on the building Python's version."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text(), 'task': tfds.features.ClassLabel(names=TASKS)}
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    examples = mixture_examples()
    self.info.metadata['python_version'] = sys.version
    self.info.metadata['task_counts'] = {
      split: {task: sum(t == task for t, _ in rows) for task in TASKS}
      for split, rows in examples.items()
    }
    return {split: self._generate_examples(rows) for split, rows in examples.items()}

  def _generate_examples(self, rows):
    for i, (task, text) in enumerate(rows):
      yield i, {'text': text, 'task': task}
