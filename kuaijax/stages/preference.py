"""Preference data stages: (chosen, rejected) pairs from a policy's own samples."""

from __future__ import annotations

from kuaijax.methods.dpo import pair_records
from kuaijax.stages.base import register_stage_type


@register_stage_type('pairs', refs=('data',))
def pairs_stage(stage) -> dict:
  """Options: data (a sample stage), max_pairs_per_prompt, gold_fallback. Writes pairs.jsonl."""
  block = stage.block
  pairs, stats = pair_records(
    stage.records(block.data),
    max_pairs_per_prompt=block.max_pairs_per_prompt,
    gold_fallback=block.gold_fallback,
  )
  if not pairs:
    raise RuntimeError(f'stage {stage.name}: no (correct, wrong) pair: {stats}')
  stage.write_data(pairs)
  return stats
