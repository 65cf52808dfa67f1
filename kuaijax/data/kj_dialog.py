"""tfds builder `kj_dialog`: multi-turn sessions whose later turns depend on the history (CaPO).

Everything comes from `kuaijax.data.dialog` (no download), so the data set is identical on every
machine. A session has 8-12 turns; per turn: the user text, the exact assistant answer, the query
kind, whether it depends on the history and on which turns (`depends_on`: two 1-based turn numbers
per turn, 0 = none). Splits use disjoint seeds and never share a session.

`decode_session` reads a session from the data source; as a task record (the task 'kj_dialog' of
`kuaijax.data.tasks`) a session is `session_record` (`messages` plus per-turn kinds and
dependencies), read back, its answers checked by the program, by `record_turns`.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from kuaijax.data import chat, dialog


class KjDialog(tfds.core.GeneratorBasedBuilder):
  """Multi-turn list-operation sessions, 5000/250/250 train/validation/test sessions."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'user': tfds.features.Sequence(tfds.features.Text()),
          'assistant': tfds.features.Sequence(tfds.features.Text()),
          'kind': tfds.features.Sequence(tfds.features.Text()),
          'context_dependent': tfds.features.Sequence(np.bool_),
          'depends_on': tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
          'num_turns': tfds.features.Scalar(dtype=np.int32),
          'id': tfds.features.Scalar(dtype=np.int64),
        }
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    splits = dialog.generate_splits(dialog.DEFAULT_SPLIT_SIZES)
    return {name: self._generate_examples(sessions) for name, sessions in splits.items()}

  def _generate_examples(self, sessions):
    for id_, turns in sessions:
      depends_on = np.zeros((len(turns), 2), np.int32)
      for i, turn in enumerate(turns):
        depends_on[i, : len(turn.depends_on)] = turn.depends_on
      yield (
        id_,
        {
          'user': [t.user for t in turns],
          'assistant': [t.assistant for t in turns],
          'kind': [t.kind for t in turns],
          'context_dependent': [t.context_dependent for t in turns],
          'depends_on': depends_on,
          'num_turns': len(turns),
          'id': id_,
        },
      )


def decode_session(example: dict) -> list[dialog.Turn]:
  """The turns of one kj_dialog example as read from a tfds data source."""
  text = lambda values: [v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in values]
  return [
    dialog.Turn(user, assistant, kind, tuple(int(d) for d in deps if d))
    for user, assistant, kind, deps in zip(
      text(example['user']),
      text(example['assistant']),
      text(example['kind']),
      np.asarray(example['depends_on']).reshape(-1, 2),
      strict=True,
    )
  ]


def session_record(turns: Sequence[dialog.Turn]) -> dict:
  """A kj_dialog session as a record: `messages` plus per-turn kinds and dependencies."""
  return {
    'messages': chat.session_messages([t.user for t in turns], [t.assistant for t in turns]),
    'kinds': [t.kind for t in turns],
    'depends_on': [list(t.depends_on) for t in turns],
  }


def record_turns(record: dict) -> list[dialog.Turn]:
  """The turns of a session record, recomputed (and so checked) by the kj_dialog program."""
  users = [m['content'] for m in record['messages'] if m['role'] == 'user']
  turns = dialog.run_session(users)
  shown = [m['content'] for m in record['messages'] if m['role'] == 'assistant']
  if [t.assistant for t in turns] != shown:
    raise ValueError('a session record whose answers are not the program answers')
  return turns
