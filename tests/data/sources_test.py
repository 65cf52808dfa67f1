import json

import pytest

from kuaijax.data import sources


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv('KUAIJAX_DATA_DIR', '/some/dir')
  assert sources.default_data_dir() == '/some/dir'
  monkeypatch.delenv('KUAIJAX_DATA_DIR')
  assert sources.default_data_dir().endswith('tensorflow_datasets')


def test_embedded_sources(data_dir):
  source = sources.get_data_source('kj_arith', split='validation', data_dir=data_dir)
  assert len(source) == 1000 and set(source[0]) >= {'question', 'solution', 'answer'}
  source = sources.get_data_source('kj_lm_mixture', split='test', data_dir=data_dir)
  assert set(source[0]) == {'text', 'task'}


def test_jsonl_source(tmp_path):
  path = tmp_path / 'train.jsonl'
  records = [{'text': 'a b', 'task': 'copy', 'extra': 1}, {'text': 'c'}]
  path.write_text('\n'.join(json.dumps(r) for r in records) + '\n\n')
  source = sources.get_data_source(
    f'jsonl:{tmp_path}/{{split}}.jsonl', split='train', data_dir=None
  )
  assert source == [{'text': 'a b', 'task': 'copy'}, {'text': 'c'}]


def test_jsonl_errors(tmp_path):
  missing = tmp_path / 'missing.jsonl'
  with pytest.raises(FileNotFoundError, match='missing.jsonl'):
    sources.get_data_source(f'jsonl:{missing}', split='train')
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"text": "ok"}\n{"content": "no text"}\n')
  with pytest.raises(ValueError, match='bad.jsonl:2'):
    sources.get_data_source(f'jsonl:{bad}', split='train')


@pytest.mark.parametrize('name', ['mnist', 'no_such_dataset_kj'])
def test_missing_tfds_data_set(name, tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{name}.*{tmp_path}'):
    sources.get_data_source(name, split='train', data_dir=tmp_path)
