"""grain pipelines that turn text sources into packed numpy batches for a causal LM.

Every batch is a dict of arrays shaped [batch_size, seq_len] (batch_size is per process):
  inputs       int32   token ids fed to the model (pad_id on padding)
  targets      int32   the next token of the same document (pad_id on padding)
  segment_ids  int32   1, 2, ... per packed piece within a row; 0 on padding
  positions    int32   position inside the piece, restarting at 0 for every piece
  loss_mask    float32 1 where the target is a real next token of the same document, else 0
  task_ids     int32   index into task_names of the token's example (0 on padding)

A document is [bos] + tokens + [eos]; its n + 1 (input, target) pairs are cut into pieces of at most
seq_len pairs (long documents are split, not truncated; each piece is its own segment). Pieces go
to the first row of the batch with room (first-fit over the batch's rows); when a piece fits in no
row the batch is emitted and the piece starts the next one. With pack=False every piece gets a row
to itself. Attention must be restricted to equal segment_ids, and losses weighted by loss_mask.

Checkpointing: `iter(lm_train_dataset(...))` is a grain DatasetIterator whose `get_state()` is a
small JSON-able dict; restoring it with `set_state()` (on an iterator of an identically built
dataset) resumes exactly. `lm_train_dataset_shards` adds per-shard state files
(`checkpoint_states`), which `kuaijax.train.checkpoint.DataSave` / `DataRestore` write next to the
train state so that a run resumes on a different process count; `save_iterator_state` /
`restore_iterator_state` below keep one iterator's state in a plain JSON file.
"""

import dataclasses
import functools
import itertools
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from kuaijax.data.tokenizers import Tokenizer

Batch = dict[str, np.ndarray]
# Reading and tokenizing are GIL-bound Python: reader threads made the pipeline ~35% slower.
_SERIAL_READ = grain.ReadOptions(num_threads=0)


def _task_id(example: dict, task_names: Sequence[str] | None, task_key: str) -> int:
  """Task index of an example: ints (e.g. tfds ClassLabel) as is, names looked up; 0 if absent."""
  if task_names is None or task_key not in example:
    return 0
  task = example[task_key]
  if isinstance(task, bytes):
    task = task.decode('utf-8')
  index = task_names.index(task) if isinstance(task, str) else int(task)
  if not 0 <= index < len(task_names):
    raise ValueError(f'task id {index} out of range for task_names={list(task_names)}')
  return index


def tokenize_example(
  example: dict,
  *,
  tokenizer: Tokenizer,
  task_names: Sequence[str] | None,
  text_key: str = 'text',
  task_key: str = 'task',
) -> dict[str, Any]:
  """{'tokens': int32 [bos] + text tokens + [eos], 'task': task index} for one source example."""
  text = example[text_key]
  if isinstance(text, bytes):
    text = text.decode('utf-8')
  body = tokenizer.encode_array(text)
  tokens = np.empty(len(body) + 2, np.int32)
  tokens[0], tokens[1:-1], tokens[-1] = tokenizer.bos_id, body, tokenizer.eos_id
  return {'tokens': tokens, 'task': _task_id(example, task_names, task_key)}


class _Packer:
  """Builds one [batch_size, seq_len] batch at a time from documents' (input, target) pieces."""

  def __init__(self, batch_size: int, seq_len: int, pad_id: int, pack: bool):
    self.batch_size, self.seq_len, self.pad_id, self.pack = batch_size, seq_len, pad_id, pack
    self._arange = np.arange(seq_len, dtype=np.int32)
    self.reset()

  def reset(self):
    b, n = self.batch_size, self.seq_len
    self.batch = {
      'inputs': np.full((b, n), self.pad_id, np.int32),
      'targets': np.full((b, n), self.pad_id, np.int32),
      'segment_ids': np.zeros((b, n), np.int32),
      'positions': np.zeros((b, n), np.int32),
      'loss_mask': np.zeros((b, n), np.float32),
      'task_ids': np.zeros((b, n), np.int32),
    }
    self.fill = np.zeros(b, np.int64)
    self.segments = np.zeros(b, np.int32)

  @property
  def empty(self) -> bool:
    return not self.fill.any()

  def add(self, tokens: np.ndarray, task: int, offset: int) -> int:
    """Places the document's pieces from pair `offset` on while they fit; returns the new offset.

    The document is done when the offset reaches len(tokens) - 1 (its number of pairs).
    """
    num_pairs = len(tokens) - 1
    while offset < num_pairs:
      length = min(self.seq_len, num_pairs - offset)
      free = (self.fill == 0) if not self.pack else (self.seq_len - self.fill >= length)
      rows = np.flatnonzero(free)
      if not len(rows):
        return offset
      row = rows[0]
      start = self.fill[row]
      end = start + length
      self.segments[row] += 1
      b = self.batch
      b['inputs'][row, start:end] = tokens[offset : offset + length]
      b['targets'][row, start:end] = tokens[offset + 1 : offset + length + 1]
      b['segment_ids'][row, start:end] = self.segments[row]
      b['positions'][row, start:end] = self._arange[:length]
      b['loss_mask'][row, start:end] = 1.0
      b['task_ids'][row, start:end] = task
      self.fill[row] = end if self.pack else self.seq_len
      offset += length
    return offset

  def take(self) -> Batch:
    batch = self.batch
    self.reset()
    return batch


class _PackedBatchIterator(grain.DatasetIterator):
  """Packs tokenized documents into batches; state = parent state before the pending document
  plus the number of its (input, target) pairs already emitted, so restoring is exact."""

  def __init__(self, parent: grain.DatasetIterator, packer: _Packer):
    super().__init__(parent)
    self._packer = packer
    self._pending = None  # (tokens, task) of a document not fully emitted yet.
    self._pending_state = None
    self._offset = 0

  def __next__(self) -> Batch:
    packer = self._packer
    while True:
      if self._pending is None:
        state = self._parent.get_state()
        try:
          element = next(self._parent)
        except StopIteration:
          if packer.empty:
            raise
          return packer.take()
        self._pending, self._pending_state = (element['tokens'], element['task']), state
      tokens, task = self._pending
      self._offset = packer.add(tokens, task, self._offset)
      if self._offset < len(tokens) - 1:
        return packer.take()
      self._pending, self._offset = None, 0

  def get_state(self) -> dict[str, Any]:
    if self._pending is None:
      return {'parent': self._parent.get_state(), 'offset': 0}
    return {'parent': self._pending_state, 'offset': self._offset}

  def set_state(self, state: dict[str, Any]):
    self._parent.set_state(state['parent'])
    self._packer.reset()
    self._pending = None
    if state['offset']:
      self._pending_state = state['parent']
      element = next(self._parent)
      self._pending = (element['tokens'], element['task'])
    self._offset = state['offset']


class _PackedBatchDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, *, batch_size, seq_len, pad_id, pack):
    super().__init__(parent)
    self._args = (batch_size, seq_len, pad_id, pack)

  def __iter__(self) -> _PackedBatchIterator:
    return _PackedBatchIterator(self._parent.__iter__(), _Packer(*self._args))


class _ConcatRowsIterator(grain.DatasetIterator):
  """This process's rows (`rows`) of one batch from each parent (data shard), concatenated; state =
  the parents' states.

  Its checkpoint state is one file per shard (`shard_<s>-of-<count>`), so a checkpoint written by
  one process count restores onto any other the shard count allows. Processes that read the same
  shard hold the same state: the first of them (`writer`) saves it.
  """

  def __init__(
    self, parents, shard_ids: Sequence[int], shard_count: int, rows: slice, writer: bool
  ):
    super().__init__(parents)
    self._names = [f'shard_{s}-of-{shard_count}' for s in shard_ids]
    self._rows, self._writer = rows, writer

  def __next__(self) -> Batch:
    parts = [next(p) for p in self._parents]
    return {k: np.concatenate([b[k][self._rows] for b in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {'shards': [p.get_state() for p in self._parents]}

  def set_state(self, state: dict[str, Any]):
    for parent, shard_state in zip(self._parents, state['shards'], strict=True):
      parent.set_state(shard_state)

  def checkpoint_states(self) -> dict[str, Any]:
    if not self._writer:
      return {}
    return {name: p.get_state() for name, p in zip(self._names, self._parents, strict=True)}

  def restore_states(self, read) -> None:
    for name, parent in zip(self._names, self._parents, strict=True):
      parent.set_state(read(name))


class _ConcatRowsDataset(grain.IterDataset):
  def __init__(self, parents, shard_ids: Sequence[int], shard_count: int, rows: slice, writer):
    super().__init__(parents)
    self._args = (tuple(shard_ids), shard_count, rows, writer)

  def __iter__(self) -> _ConcatRowsIterator:
    return _ConcatRowsIterator([p.__iter__() for p in self._parents], *self._args)


@dataclasses.dataclass(frozen=True)
class ShardReading:
  """How one process reads the data shards (`process_shards`).

  shards   the shards it reads
  readers  how many processes read each of them (1, or process_count / shard_count)
  part     its place among those readers: it keeps part `part` of `readers` of each shard's rows
  """

  shards: range
  readers: int
  part: int

  def rows(self, batch_size: int) -> tuple[int, slice]:
    """(rows of each shard's batch, this process's rows of it) for a per-process `batch_size`."""
    if batch_size % len(self.shards):
      raise ValueError(
        f'per-process batch {batch_size} is not divisible by its {len(self.shards)} shards'
      )
    mine = batch_size // len(self.shards)
    return mine * self.readers, slice(self.part * mine, (self.part + 1) * mine)


def process_shards(shard_count: int, process_index: int, process_count: int) -> ShardReading:
  """The data shards one process reads, and its rows of them.

  A global batch is the concatenation of every shard's rows in shard order (B / S rows each for a
  global batch of B rows and S shards), so with a fixed `shard_count` S the global batches do not
  depend on how many processes P read them. S a multiple of P: process p reads the S / P
  consecutive shards from p * S / P, all their rows. S a divisor of P: P / S consecutive processes
  read shard p * S // P, each keeping its consecutive part of the shard's rows (S = 1: every
  process reads the one stream and keeps its rows; the packing is then repeated on every process).
  """
  if shard_count <= 0 or (shard_count % process_count and process_count % shard_count):
    raise ValueError(
      f'data shards={shard_count} must be a positive multiple or divisor of the process count '
      f'({process_count})'
    )
  if shard_count >= process_count:
    per = shard_count // process_count
    return ShardReading(range(process_index * per, (process_index + 1) * per), 1, 0)
  readers = process_count // shard_count
  shard = process_index // readers
  return ShardReading(range(shard, shard + 1), readers, process_index % readers)


def lm_train_dataset_shards(
  source: Sequence[dict] | grain.MapDataset,
  *,
  batch_size: int,
  shard_count: int,
  process_index: int = 0,
  process_count: int = 1,
  **kwargs,
) -> grain.IterDataset:
  """This process's `batch_size` rows: `lm_train_dataset` of each of its shards, its rows of each
  concatenated (`process_shards`).

  Shard s holds examples s, s + shard_count, ... (as process s of shard_count would read them);
  with shard_count == process_count this is exactly `lm_train_dataset` of this process's slice,
  with shard_count == 1 it is this process's rows of `lm_train_dataset` of the whole source.
  """
  reading = process_shards(shard_count, process_index, process_count)
  shard_rows, rows = reading.rows(batch_size)
  parts = [
    lm_train_dataset(
      source, batch_size=shard_rows, process_index=s, process_count=shard_count, **kwargs
    )
    for s in reading.shards
  ]
  return _ConcatRowsDataset(parts, reading.shards, shard_count, rows, reading.part == 0)


def _tokenized(
  source, *, tokenizer, task_names, text_key, task_key, process_index, process_count
) -> grain.MapDataset:
  """The process's slice of the source (examples i with i % process_count == process_index),
  tokenized lazily by `tokenize_example`."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  return ds[process_index::process_count].map(
    functools.partial(
      tokenize_example,
      tokenizer=tokenizer,
      task_names=task_names,
      text_key=text_key,
      task_key=task_key,
    )
  )


def lm_train_dataset(
  source: Sequence[dict] | grain.MapDataset,
  *,
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  seed: int,
  pack: bool = True,
  task_names: Sequence[str] | None = None,
  text_key: str = 'text',
  task_key: str = 'task',
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """Infinite, shuffled, packed training batches for one process (see the module docstring).

  Order: process slice (examples process_index, process_index + process_count, ...) -> shuffle with
  `seed` (reshuffled every epoch) -> repeat -> tokenize -> pack/pad -> batch. The same arguments give
  the same batches; `iter()` of the result checkpoints exactly through get_state/set_state.
  task_names=None gives task_ids 0 everywhere; otherwise the source's task values are indices into
  task_names (ints, as tfds ClassLabel gives) or names from task_names.

  The iterator is synchronous (about 5k rows of 256 byte tokens per second on one CPU core). To
  overlap input work with the train step, wrap the result in
  `grain.experimental.ThreadPrefetchIterDataset` and `close()` its iterator before the process
  exits: a prefetch thread still running at interpreter shutdown can abort the process.
  """
  ds = _tokenized(
    source,
    tokenizer=tokenizer,
    task_names=task_names,
    text_key=text_key,
    task_key=task_key,
    process_index=process_index,
    process_count=process_count,
  )
  return _PackedBatchDataset(
    ds.shuffle(seed=seed).repeat().to_iter_dataset(_SERIAL_READ),
    batch_size=batch_size,
    seq_len=seq_len,
    pad_id=tokenizer.pad_id,
    pack=pack,
  )


def lm_eval_batches(
  source: Sequence[dict] | grain.MapDataset,
  *,
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  num_batches: int | None = None,
  pack: bool = True,
  task_names: Sequence[str] | None = None,
  text_key: str = 'text',
  task_key: str = 'task',
  process_index: int = 0,
  process_count: int = 1,
) -> list[Batch]:
  """The split in order (no shuffle or repeat) as a fixed list of batches, same fields as training.

  Rows after the data runs out are all padding (loss_mask 0). num_batches cuts the list short or
  pads it with all-padding batches; it is required when process_count > 1 so that every process
  runs the same number of evaluation steps.
  """
  if num_batches is None and process_count > 1:
    raise ValueError('num_batches is required when process_count > 1 (equal steps per process)')
  ds = _tokenized(
    source,
    tokenizer=tokenizer,
    task_names=task_names,
    text_key=text_key,
    task_key=task_key,
    process_index=process_index,
    process_count=process_count,
  )
  packed = _PackedBatchDataset(
    ds.to_iter_dataset(_SERIAL_READ),
    batch_size=batch_size,
    seq_len=seq_len,
    pad_id=tokenizer.pad_id,
    pack=pack,
  )
  batches = list(itertools.islice(packed, num_batches))
  while len(batches) < (num_batches or 0):
    batches.append(_Packer(batch_size, seq_len, tokenizer.pad_id, pack).take())
  return batches


def lm_eval_batches_shards(
  source: Sequence[dict] | grain.MapDataset,
  *,
  batch_size: int,
  num_batches: int,
  shard_count: int,
  process_index: int = 0,
  process_count: int = 1,
  **kwargs,
) -> list[Batch]:
  """`lm_eval_batches` over this process's shards and rows (as `lm_train_dataset_shards`),
  concatenated."""
  reading = process_shards(shard_count, process_index, process_count)
  shard_rows, rows = reading.rows(batch_size)
  parts = [
    lm_eval_batches(
      source,
      batch_size=shard_rows,
      num_batches=num_batches,
      process_index=s,
      process_count=shard_count,
      **kwargs,
    )
    for s in reading.shards
  ]
  return [
    {k: np.concatenate([p[i][k][rows] for p in parts]) for k in parts[0][i]}
    for i in range(num_batches)
  ]


def unigram_counts(
  source: Sequence[dict] | grain.MapDataset,
  tokenizer: Tokenizer,
  max_examples: int | None = None,
  text_key: str = 'text',
) -> np.ndarray:
  """Counts of target tokens (text tokens + eos; bos is never a target) over the first examples."""

  def targets(i: int) -> np.ndarray:
    example = tokenize_example(source[i], tokenizer=tokenizer, task_names=None, text_key=text_key)
    return example['tokens'][1:]

  counts = np.zeros(tokenizer.vocab_size, np.int64)
  num = len(source) if max_examples is None else min(max_examples, len(source))
  for start in range(0, num, 4096):
    chunk = np.concatenate([targets(i) for i in range(start, min(start + 4096, num))])
    counts += np.bincount(chunk, minlength=tokenizer.vocab_size)
  return counts


def save_iterator_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
  """Writes `iterator.get_state()` as JSON (use one path per process)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(iterator.get_state()))


def restore_iterator_state(iterator: grain.DatasetIterator, path: str | os.PathLike) -> None:
  """Sets a fresh iterator of an identically built dataset to the state saved at `path`."""
  iterator.set_state(json.loads(pathlib.Path(path).read_text()))
