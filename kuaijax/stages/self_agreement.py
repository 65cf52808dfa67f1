"""Stage type 'sa_toy_data': the Self-Agreement toy SFT data set (`kuaijax.inference.sa_toy`).

Writes (prompt, completion) records for a 'train' stage with method 'sft': kj_arith TRAINING
problems (`levels`, the first `limit`; 0 = all) with and without the answer trigger, `word_examples`
word questions, and `sets` SA plus `sets` USC aggregation examples (k drawn from `k_choices`)
built from those training problems only, drawn with `random.Random(seed)`. The data set does not
depend on the pipeline seed (seeded=False): every training seed trains on the same records. Each
record's `kind` says which part it belongs to (trigger, no_trigger, word, sa, usc).
"""

from __future__ import annotations

import random

from kuaijax.data import tasks
from kuaijax.inference import aggregate, sa_toy
from kuaijax.stages.base import Stage, register_stage_type


def _kind(prompt: str) -> str:
  if prompt.endswith(aggregate.SA_CUE):
    return 'sa'
  if prompt.endswith(aggregate.USC_CUE):
    return 'usc'
  if prompt.endswith(sa_toy.NO_TRIGGER_CUE + '\n'):
    return 'word' if prompt.startswith('Question: Which word') else 'no_trigger'
  return 'trigger'


@register_stage_type('sa_toy_data', seeded=False)
def sa_toy_data(stage: Stage) -> dict:
  b = stage.block
  problems = tasks.load_arith_problems(
    'train', levels=tuple(b.levels), limit=b.limit, data_dir=stage.config.data.data_dir
  )
  words = sa_toy.word_problems(sa_toy.TRAIN_WORD_SEED, b.word_examples)
  pairs = sa_toy.training_pairs(
    problems, words, sets=b.sets, k_choices=tuple(b.k_choices), rng=random.Random(b.seed)
  )
  records = [{'prompt': p, 'completion': c, 'kind': _kind(p)} for p, c in pairs]
  stage.write_data(records)
  counts = {}
  for r in records:
    counts[r['kind']] = counts.get(r['kind'], 0) + 1
  return {'records': len(records), 'problems': len(problems), 'words': len(words), **counts}
