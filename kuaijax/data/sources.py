"""Random-access data sources by name: embedded tfds builders, prepared tfds data sets, jsonl files.

Every source has `len()` and integer indexing, returning a dict per example, which is what the grain
pipelines in `kuaijax.data.pipeline` take. Nothing here touches the network.
"""

import contextlib
import fcntl
import os
import pathlib
from collections.abc import Sequence

import tensorflow_datasets as tfds

from kuaijax.data import chat_files, gsm8k, kj_arith, kj_dialog, kj_lm_mixture, records

# Builders generated on first use (importing their modules also registers them with tfds).
_BUILDERS = {
  'kj_arith': kj_arith.KjArith,
  'kj_dialog': kj_dialog.KjDialog,
  'kj_lm_mixture': kj_lm_mixture.KjLmMixture,
}
EMBEDDED = tuple(_BUILDERS)
JSONL_PREFIX = 'jsonl:'
# Local files by prefix ('prefix:/path', `{split}` in the path replaced by the split).
_FILE_LOADERS = {
  'sharegpt:': lambda path: chat_files.load_sharegpt(path)[0],
  'mt_bench:': chat_files.load_mt_bench,
  gsm8k.PREFIX: gsm8k.load_gsm8k,
}


def default_data_dir() -> str:
  """$KUAIJAX_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get('KUAIJAX_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """An exclusive flock, so concurrent processes on one host build a data set only once."""
  with path.open('a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare_embedded(name: str, data_dir: str | os.PathLike) -> None:
  """Builds an embedded data set into data_dir unless it is there already.

  Safe for several processes on one host (file lock; tfds also writes to a temporary directory and
  renames it). On multi-host runs with a shared data_dir, call it on one process before the others
  read, or prepare the data set ahead of time.
  """
  make = lambda: _BUILDERS[name](data_dir=str(data_dir), file_format='array_record')
  if make().is_prepared():  # No lock needed, so a read-only data_dir works.
    return
  data_dir = pathlib.Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  with _file_lock(data_dir / f'.{name}.lock'):
    builder = make()  # Another process may have finished while we waited.
    if not builder.is_prepared():
      builder.download_and_prepare()


def load_jsonl(path: str | os.PathLike) -> list[dict]:
  """Records of a jsonl file; each needs a 'text' field, 'task' is kept when present."""
  out = []
  for where, record in records.iter_jsonl(path):
    if not isinstance(record, dict) or 'text' not in record:
      raise ValueError(f'{where}: record has no "text" field')
    out.append({k: record[k] for k in ('text', 'task') if k in record})
  return out


def get_data_source(
  name: str, *, split: str, data_dir: str | os.PathLike | None = None
) -> Sequence[dict]:
  """A random-access source for one split.

  name: 'kj_arith' / 'kj_dialog' / 'kj_lm_mixture' (built into data_dir on first use); any other
  tfds name (must already be prepared in data_dir, in array_record format); or a local file:
  'jsonl:/path/file.jsonl', 'sharegpt:/path/file.json' (records with `messages`, see
  `chat_files.load_sharegpt`), 'mt_bench:/path/question.jsonl' (`chat_files.load_mt_bench`);
  `{split}` in a path is replaced by the split. data_dir defaults to `default_data_dir()`.
  """
  if name.startswith(JSONL_PREFIX):
    return load_jsonl(name.removeprefix(JSONL_PREFIX).replace('{split}', split))
  for prefix, load in _FILE_LOADERS.items():
    if name.startswith(prefix):
      return load(name.removeprefix(prefix).replace('{split}', split))
  data_dir = str(data_dir or default_data_dir())
  if name in EMBEDDED:
    prepare_embedded(name, data_dir)
  else:
    try:
      prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
      prepared = False
    if not prepared:
      raise FileNotFoundError(
        f'tfds data set {name!r} is not prepared in data_dir={data_dir!r}; prepare it there first '
        '(no downloads at run time), in array_record format.'
      )
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
