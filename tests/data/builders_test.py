import collections
import os
import pathlib
import subprocess
import sys

import tensorflow_datasets as tfds

import kuaijax
from kuaijax.data import arith, kj_lm_mixture


def _read(data_dir, name, split):
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def test_kj_arith_splits_and_features(data_dir):
  builder = tfds.builder('kj_arith', data_dir=data_dir)
  assert {s: builder.info.splits[s].num_examples for s in ('train', 'validation', 'test')} == (
    arith.DEFAULT_SPLIT_SIZES
  )
  questions = {}
  for split in ('train', 'validation', 'test'):
    source = _read(data_dir, 'kj_arith', split)
    questions[split] = {source[i]['question'] for i in range(len(source))}
    assert len(questions[split]) == len(source)
  assert not questions['train'] & questions['validation']
  assert not questions['train'] & questions['test']
  assert not questions['validation'] & questions['test']
  validation = _read(data_dir, 'kj_arith', 'validation')
  assert set(validation[0]) == {'question', 'solution', 'answer', 'level', 'steps', 'id'}
  for example in (validation[i] for i in range(len(validation))):
    steps = arith.parse_steps(example['solution'].decode())
    assert arith.verify_steps(steps) is None
    assert arith.extract_answer(example['solution'].decode()) == example['answer']
    assert len(steps) == example['steps'] and example['level'] in arith.LEVELS


def test_kj_lm_mixture_metadata_and_counts(data_dir):
  builder = tfds.builder('kj_lm_mixture', data_dir=data_dir)
  assert builder.info.features['task'].names == list(kj_lm_mixture.TASKS)
  assert builder.info.metadata['python_version'] == sys.version
  counts = builder.info.metadata['task_counts']
  for split in ('train', 'validation', 'test'):
    source = _read(data_dir, 'kj_lm_mixture', split)
    assert sum(counts[split].values()) == len(source)
    if split != 'train':
      actual = collections.Counter(
        kj_lm_mixture.TASKS[source[i]['task']] for i in range(len(source))
      )
      assert actual == counts[split]
      assert min(actual.values()) >= 300
  assert min(counts['train'].values()) >= 3000


def test_kj_lm_mixture_texts(data_dir):
  source = _read(data_dir, 'kj_lm_mixture', 'validation')
  by_task = collections.defaultdict(list)
  for i in range(200):
    by_task[kj_lm_mixture.TASKS[source[i]['task']]].append(source[i]['text'].decode())
  assert set(by_task) == set(kj_lm_mixture.TASKS)
  code = by_task['code']
  assert sum(len(text) >= kj_lm_mixture.MIN_CHUNK_CHARS for text in code) >= 0.9 * len(code)
  assert all('\nSolution:\n[1] ' in text for text in by_task['arith'])
  for text in by_task['copy']:
    left, right = text.removeprefix('copy: ').split(' | ')
    assert left == right
  for text in by_task['recall']:
    pairs, query = text.removeprefix('recall: ').split('. query ')
    key, value = query.split(' -> ')
    assert f'{key}={value}' in pairs.split(', ')


def test_code_examples_skip_dirs_and_split_by_file(tmp_path):
  names = [
    'a.py',
    'pkg/b.py',
    'pkg/c.py',
    'test/t.py',
    'idlelib/i.py',
    'site-packages/s.py',
    'x.txt',
  ]
  for relative in names:
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'# {relative}\n' * 300)
  files = [relative for relative, _ in kj_lm_mixture.stdlib_files(str(tmp_path))]
  assert files == ['a.py', 'pkg/b.py', 'pkg/c.py']
  chunks = kj_lm_mixture.code_examples(dict.fromkeys(kj_lm_mixture.SPLITS, 10**9), str(tmp_path))
  for split, texts in chunks.items():
    for text in texts:
      (relative,) = {line.removeprefix('# ') for line in text.splitlines()}
      assert kj_lm_mixture.code_split(relative) == split
  assert sum(map(len, sum(chunks.values(), []))) == sum(len(f'# {f}\n') * 300 for f in files)


def test_chunk_lines_keeps_all_text_on_line_boundaries():
  text = ''.join(f'line {i}\n' for i in range(1000))
  chunks = kj_lm_mixture.chunk_lines(text, min_chars=500)
  assert ''.join(chunks) == text
  assert all(chunk.endswith('\n') for chunk in chunks)
  assert all(500 <= len(chunk) < 520 for chunk in chunks[:-1])
  assert kj_lm_mixture.chunk_lines('short\n') == ['short\n']
  assert kj_lm_mixture.chunk_lines('a' * 600 + '\nb\n', min_chars=500) == ['a' * 600 + '\nb\n']


def test_concurrent_builds_into_one_data_dir(tmp_path, data_dir):
  root = pathlib.Path(kuaijax.__file__).parent.parent
  env = {**os.environ, 'PYTHONPATH': f'{root}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}
  code = (
    f'from kuaijax.data import sources; sources.prepare_embedded("kj_arith", {str(tmp_path)!r})'
  )
  procs = [
    subprocess.Popen([sys.executable, '-c', code], env=env, stderr=subprocess.PIPE)
    for _ in range(2)
  ]
  for proc in procs:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
  fresh, built = _read(str(tmp_path), 'kj_arith', 'test'), _read(data_dir, 'kj_arith', 'test')
  assert [fresh[i] for i in range(len(fresh))] == [built[i] for i in range(len(built))]
