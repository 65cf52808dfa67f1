"""tfds builder `kj_arith`: generated arithmetic word problems with numbered solution steps.

Used by RLMEC, Self-Agreement and GRPO. Everything comes from `kuaijax.data.arith` (no download),
so the data set is identical on every machine. Splits use disjoint seeds and no question appears
twice in or across splits.
"""

import numpy as np
import tensorflow_datasets as tfds

from kuaijax.data import arith


class KjArith(tfds.core.GeneratorBasedBuilder):
  """Arithmetic word problems, levels 1..4, 20000/1000/1000 train/validation/test examples."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'question': tfds.features.Text(),
          'solution': tfds.features.Text(),
          'answer': tfds.features.Scalar(dtype=np.int64),
          'level': tfds.features.Scalar(dtype=np.int32),
          'steps': tfds.features.Scalar(dtype=np.int32),
          'id': tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=('question', 'solution'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    splits = arith.generate_splits(arith.DEFAULT_SPLIT_SIZES)
    return {name: self._generate_examples(problems) for name, problems in splits.items()}

  def _generate_examples(self, problems):
    for id_, problem in problems:
      yield (
        id_,
        {
          'question': problem.question,
          'solution': problem.solution,
          'answer': problem.answer,
          'level': problem.level,
          'steps': problem.steps,
          'id': id_,
        },
      )
