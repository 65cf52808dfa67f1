import collections
import json
import re

import grain
import numpy as np
import pytest

from kuaijax.data import kj_lm_mixture, pipeline, sources
from kuaijax.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
FIELDS = {
  'inputs': np.int32,
  'targets': np.int32,
  'segment_ids': np.int32,
  'positions': np.int32,
  'loss_mask': np.float32,
  'task_ids': np.int32,
}


def _docs(num=300, long_every=0):
  """Documents 'doc <i>: ...' of varied length; every long_every-th one is several rows long."""
  rng = np.random.default_rng(0)
  docs = []
  for i in range(num):
    words = rng.integers(2, 30) if not (long_every and i % long_every == 0) else 150
    body = ' '.join(f'{i}.{j:03d}' for j in range(words))
    docs.append({'text': f'doc {i}: {body}', 'task': ['a', 'b', 'c'][i % 3]})
  return docs


def _segments(batch):
  """(inputs, targets, positions, loss_mask, task_ids) of every packed piece."""
  keys = ('inputs', 'targets', 'positions', 'loss_mask', 'task_ids')
  for row in range(batch['inputs'].shape[0]):
    for segment in np.unique(batch['segment_ids'][row]):
      if segment:
        idx = batch['segment_ids'][row] == segment
        yield tuple(batch[k][row][idx] for k in keys)


def _doc_ids(batch):
  """Ids of the documents whose first piece is in the batch."""
  return [
    int(re.match(r'doc (\d+):', TOK.decode(inputs)).group(1))
    for inputs, *_ in _segments(batch)
    if inputs[0] == TOK.bos_id
  ]


def _assert_batch_invariants(batch, batch_size, seq_len):
  assert set(batch) == set(FIELDS)
  for key, dtype in FIELDS.items():
    assert batch[key].shape == (batch_size, seq_len) and batch[key].dtype == dtype, key
  seg, pos = batch['segment_ids'], batch['positions']
  real = seg > 0
  np.testing.assert_array_equal(batch['loss_mask'], real.astype(np.float32))
  assert (batch['inputs'][~real] == TOK.pad_id).all() and (
    batch['targets'][~real] == TOK.pad_id
  ).all()
  assert (batch['task_ids'][~real] == 0).all()
  for row in range(batch_size):
    # Segments are 1, 2, ... left to right; padding only at the end of the row.
    used = int(real[row].sum())
    assert (seg[row][:used] > 0).all() and (seg[row][used:] == 0).all()
    assert used == 0 or (seg[row][0] == 1 and set(np.diff(seg[row][:used])) <= {0, 1})
    starts = np.flatnonzero(np.diff(seg[row][:used], prepend=0))
    assert (pos[row][starts] == 0).all()
  for inputs, targets, positions, mask, tasks in _segments(batch):
    np.testing.assert_array_equal(positions, np.arange(len(inputs)))
    # Targets are the next input within the piece: they never cross into another segment.
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    assert (mask == 1).all() and (tasks == tasks[0]).all()


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _equal(batches_a, batches_b):
  return len(batches_a) == len(batches_b) and all(
    all(np.array_equal(a[k], b[k]) for k in FIELDS) for a, b in zip(batches_a, batches_b)
  )


@pytest.mark.parametrize('pack', [True, False])
def test_batches_are_well_formed(pack):
  ds = pipeline.lm_train_dataset(
    _docs(long_every=7),
    tokenizer=TOK,
    seq_len=128,
    batch_size=8,
    seed=0,
    pack=pack,
    task_names=('a', 'b', 'c'),
  )
  batches = _take(ds, 30)
  for batch in batches:
    _assert_batch_invariants(batch, 8, 128)
  if pack:
    assert np.mean([b['loss_mask'].mean() for b in batches]) > 0.85
  else:
    assert all((b['segment_ids'].max(axis=1) == 1).all() for b in batches)


class _PositionTokenizer:
  """Text 'd:n' -> n tokens that encode (document d, position), so every piece can be located."""

  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 10**7

  def encode_array(self, text):
    doc, length = map(int, text.split(':'))
    return (3 + doc * 10_000 + np.arange(length)).astype(np.int32)


@pytest.mark.parametrize('pack', [True, False])
def test_documents_survive_packing_exactly(pack):
  """Every document comes out exactly once: pieces of long ones are consecutive slices of it."""
  lengths = np.random.default_rng(0).integers(1, 200, size=150)
  docs = [{'text': f'{d}:{n}'} for d, n in enumerate(lengths)]
  tok = _PositionTokenizer()
  pieces = collections.defaultdict(list)
  for batch in pipeline.lm_eval_batches(docs, tokenizer=tok, seq_len=48, batch_size=4, pack=pack):
    _assert_batch_invariants(batch, 4, 48)
    for inputs, targets, *_ in _segments(batch):
      piece = np.append(inputs, targets[-1])
      text = piece[piece >= 3]
      (doc,) = set((text - 3) // 10_000)
      start = -1 if piece[0] == tok.bos_id else (piece[0] - 3) % 10_000
      pieces[doc].append((start, piece.tolist()))
  assert sorted(pieces) == list(range(len(docs)))
  for doc, found in pieces.items():
    whole = [tok.bos_id, *tok.encode_array(docs[doc]['text']).tolist(), tok.eos_id]
    rebuilt = []
    for _, piece in sorted(found):
      assert not rebuilt or rebuilt[-1] == piece[0]  # consecutive pieces share one token
      rebuilt = rebuilt[:-1] + piece
    assert rebuilt == whole
  assert max(len(found) for found in pieces.values()) >= 4


def test_same_seed_same_batches_different_seed_different():
  make = lambda seed: pipeline.lm_train_dataset(
    _docs(), tokenizer=TOK, seq_len=64, batch_size=4, seed=seed
  )
  assert _equal(_take(make(1), 20), _take(make(1), 20))
  assert not _equal(_take(make(1), 20), _take(make(2), 20))


def test_epochs_cover_all_documents_in_a_new_order():
  docs = _docs(60)
  # One row per batch keeps the documents in stream order.
  ds = pipeline.lm_train_dataset(docs, tokenizer=TOK, seq_len=512, batch_size=1, seed=0)
  order = [i for batch in _take(ds, 80) for i in _doc_ids(batch)]
  assert sorted(order[:60]) == list(range(60))
  assert order[60:120] != order[:60] and sorted(order[60:120]) == list(range(60))


def test_task_ids():
  docs = [{'text': 'x' * 10, 'task': 'b'}, {'text': 'y' * 10, 'task': 2}, {'text': 'z' * 10}]
  (batch,) = pipeline.lm_eval_batches(
    docs, tokenizer=TOK, seq_len=64, batch_size=1, task_names=('a', 'b', 'c')
  )
  assert [tasks[0] for *_, tasks in _segments(batch)] == [1, 2, 0]
  (batch,) = pipeline.lm_eval_batches(docs, tokenizer=TOK, seq_len=64, batch_size=1)
  assert not batch['task_ids'].any()
  with pytest.raises(ValueError):
    pipeline.lm_eval_batches(
      [{'text': 'x', 'task': 'd'}], tokenizer=TOK, seq_len=8, batch_size=1, task_names=('a',)
    )


@pytest.mark.parametrize('skip', [3, 10, 17])
def test_iterator_resumes_exactly(skip, tmp_path):
  ds = pipeline.lm_train_dataset(
    _docs(100, long_every=3), tokenizer=TOK, seq_len=64, batch_size=4, seed=7
  )
  it = iter(ds)
  for _ in range(skip):
    next(it)
  pipeline.save_iterator_state(it, tmp_path / 'state.json')
  expected = [next(it) for _ in range(12)]
  restored = iter(ds)
  pipeline.restore_iterator_state(restored, tmp_path / 'state.json')
  assert _equal([next(restored) for _ in range(12)], expected)


def test_iterator_state_mid_document():
  """States saved while a long document is half emitted still resume exactly."""
  ds = pipeline.lm_train_dataset(
    _docs(50, long_every=1), tokenizer=TOK, seq_len=64, batch_size=2, seed=0
  )
  it = iter(ds)
  batches, states = [], []
  for _ in range(25):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  mid_document = [k for k, state in enumerate(states) if state['offset'] > 0]
  assert len(mid_document) >= 3
  for k in mid_document[:5]:
    restored = iter(ds)
    restored.set_state(states[k])
    assert _equal([next(restored) for _ in range(25 - k)], batches[k:])


def test_orbax_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  ds = pipeline.lm_train_dataset(_docs(), tokenizer=TOK, seq_len=64, batch_size=4, seed=3)
  it = iter(ds)
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(5)]
    restored = iter(ds)
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert _equal([next(restored) for _ in range(5)], expected)


def test_processes_get_disjoint_shards():
  docs = _docs(101)
  seen = []
  for index in range(2):
    ds = pipeline.lm_train_dataset(
      docs, tokenizer=TOK, seq_len=128, batch_size=4, seed=0, process_index=index, process_count=2
    )
    ids = {i for batch in _take(ds, 30) for i in _doc_ids(batch)}
    assert {i % 2 for i in ids} == {index}
    eval_ids = [
      i
      for batch in pipeline.lm_eval_batches(
        docs,
        tokenizer=TOK,
        seq_len=128,
        batch_size=4,
        num_batches=40,
        process_index=index,
        process_count=2,
      )
      for i in _doc_ids(batch)
    ]
    seen.append(eval_ids)
  assert sorted(seen[0] + seen[1]) == list(range(101)) and not set(seen[0]) & set(seen[1])


def _iterators(shard_count, process_count, states=None):
  """Each process's iterator of `lm_train_dataset_shards` (global batch 8), restored from the
  saved shard `states` ({file name: state}) if given."""
  out = []
  for p in range(process_count):
    it = iter(
      pipeline.lm_train_dataset_shards(
        _docs(101),
        tokenizer=TOK,
        seq_len=64,
        seed=3,
        batch_size=8 // process_count,
        shard_count=shard_count,
        process_index=p,
        process_count=process_count,
      )
    )
    if states is not None:
      it.restore_states(lambda name: json.loads(json.dumps(states[name])))
    out.append(it)
  return out


def _global(iterators, steps=5):
  """The next `steps` global batches: the processes' batches concatenated in process order."""
  per = [_take(it, steps) for it in iterators]
  return [{k: np.concatenate([b[i][k] for b in per]) for k in FIELDS} for i in range(steps)]


@pytest.mark.parametrize('shard_count', [1, 2, 4])
def test_a_fixed_shard_count_gives_the_same_global_batches_for_any_process_count(shard_count):
  one = _global(_iterators(shard_count, 1))
  for processes in (2, 4):
    assert _equal(_global(_iterators(shard_count, processes)), one), processes
  # Shard s holds docs i with i % S = s and fills rows [8s/S, 8(s+1)/S) of every global batch.
  rows = 8 // shard_count
  for batch in one:
    for s in range(shard_count):
      part = {k: v[s * rows : (s + 1) * rows] for k, v in batch.items()}
      assert {i % shard_count for i in _doc_ids(part)} <= {s}


def test_one_shard_is_the_plain_pipeline_of_the_whole_source():
  """The default (data.shards=1) on one process is `lm_train_dataset` itself: the batches of
  runs made before shards existed."""
  plain = pipeline.lm_train_dataset(_docs(101), tokenizer=TOK, seq_len=64, seed=3, batch_size=8)
  assert _equal(_global(_iterators(1, 1)), _take(plain, 5))


@pytest.mark.parametrize('shard_count', [1, 2, 4])
def test_shard_states_resume_on_another_process_count(shard_count):
  """Each shard's state is saved once (by the first process that reads it), and the files of one
  process count continue the global batches on any other."""
  expected = _global(_iterators(shard_count, 1))
  for saved_by, resumed_by in ((4, 1), (1, 2), (2, 4)):
    iterators = _iterators(shard_count, saved_by)
    _global(iterators, 2)
    files = [it.checkpoint_states() for it in iterators]
    assert [name for f in files for name in f] == [
      f'shard_{s}-of-{shard_count}' for s in range(shard_count)
    ]
    states = {name: state for f in files for name, state in f.items()}
    resumed = _global(_iterators(shard_count, resumed_by, states), 3)
    assert _equal(resumed, expected[2:]), (saved_by, resumed_by)


@pytest.mark.parametrize('shard_count', [1, 2])
def test_eval_batches_are_the_same_for_any_process_count(shard_count):
  docs, kw = _docs(101), dict(tokenizer=TOK, seq_len=64, num_batches=3, shard_count=shard_count)
  eval_one = pipeline.lm_eval_batches_shards(docs, batch_size=4, **kw)
  for processes in (2, 4):
    per = [
      pipeline.lm_eval_batches_shards(
        docs, batch_size=4 // processes, process_index=p, process_count=processes, **kw
      )
      for p in range(processes)
    ]
    for i, batch in enumerate(eval_one):
      for k in FIELDS:
        np.testing.assert_array_equal(batch[k], np.concatenate([e[i][k] for e in per]))


def test_shard_counts_that_do_not_fit_the_process_count_are_named():
  kw = dict(tokenizer=TOK, seq_len=64, seed=3, batch_size=4)
  with pytest.raises(ValueError, match='shards=3 must be a positive multiple or divisor of the'):
    pipeline.lm_train_dataset_shards(_docs(10), process_count=2, shard_count=3, **kw)
  with pytest.raises(ValueError, match='shards=0 must be a positive'):
    pipeline.lm_train_dataset_shards(_docs(10), shard_count=0, **kw)
  with pytest.raises(ValueError, match='per-process batch 3 is not divisible by its 2 shards'):
    pipeline.lm_train_dataset_shards(_docs(10), shard_count=2, **{**kw, 'batch_size': 3})


def test_eval_batches_are_fixed_and_padded():
  docs = _docs(50)
  kwargs = dict(tokenizer=TOK, seq_len=128, batch_size=4)
  first, second = pipeline.lm_eval_batches(docs, **kwargs), pipeline.lm_eval_batches(docs, **kwargs)
  assert _equal(first, second)
  assert sorted(i for batch in first for i in _doc_ids(batch)) == list(range(50))
  assert not first[-1]['loss_mask'][-1].any()  # the last batch ends in all-padding rows
  padded = pipeline.lm_eval_batches(docs, num_batches=len(first) + 2, **kwargs)
  assert _equal(padded[: len(first)], first)
  assert not padded[-1]['loss_mask'].any() and not padded[-1]['segment_ids'].any()
  assert _equal(pipeline.lm_eval_batches(docs, num_batches=2, **kwargs), first[:2])
  with pytest.raises(ValueError, match='num_batches'):
    pipeline.lm_eval_batches(docs, process_index=0, process_count=2, **kwargs)


def test_unigram_counts():
  docs = [{'text': 'ab'}, {'text': 'b'}, {'text': ''}]
  counts = pipeline.unigram_counts(docs, TOK)
  assert counts.shape == (TOK.vocab_size,)
  expected = np.zeros(TOK.vocab_size, np.int64)
  expected[[ord('a') + 3, ord('b') + 3]] = [1, 2]
  expected[TOK.eos_id] = 3
  np.testing.assert_array_equal(counts, expected)
  assert pipeline.unigram_counts(docs, TOK, max_examples=1)[TOK.eos_id] == 1


def test_lm_mixture_end_to_end(data_dir):
  source = sources.get_data_source('kj_lm_mixture', split='train', data_dir=data_dir)
  ds = pipeline.lm_train_dataset(
    source, tokenizer=TOK, seq_len=256, batch_size=16, seed=0, task_names=kj_lm_mixture.TASKS
  )
  tokens = np.zeros(len(kj_lm_mixture.TASKS))
  for batch in _take(ds, 10):
    _assert_batch_invariants(batch, 16, 256)
    np.add.at(tokens, batch['task_ids'][batch['loss_mask'] > 0], 1)
  assert (tokens > 0).all()
  assert np.mean([b['loss_mask'].mean() for b in _take(ds, 10)]) > 0.85
