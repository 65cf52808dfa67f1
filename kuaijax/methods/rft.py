"""RFT (rejection-sampling fine-tuning): SFT on the policy's own correct samples.

Records: a `sample` stage's data set (`index`, `prompt`, `gold`, `completion_tokens`, `correct`).
Keeps the correct samples, each distinct completion once per prompt (at most `max_per_prompt`, 0 =
all), and trains on them exactly as SFT does (the sample's own tokens, eos included when it
stopped). `with_gold` adds each sampled prompt's gold completion to the set, as the RFT paper
trains on the SFT data plus the distinct correct reasoning paths (a sample equal to the gold one
counts once).
"""

from __future__ import annotations

import numpy as np

from kuaijax.data.sequences import completion_ids
from kuaijax.methods.base import register_method
from kuaijax.methods.sft import SFT


@register_method('rft')
class RFT(SFT):
  def __init__(self, ctx, *, loss=None, max_per_prompt: int = 0, with_gold: bool = False):
    super().__init__(ctx, loss=loss)
    if max_per_prompt < 0:
      raise ValueError(f'rft max_per_prompt must be >= 0, got {max_per_prompt}')
    self.max_per_prompt, self.with_gold = max_per_prompt, with_gold

  def select(self, records):
    kept, seen, per_prompt = [], set(), {}
    stats = {'samples': len(records), 'correct_samples': 0, 'duplicates': 0, 'gold': 0}

    def keep(index, record, tokens, kind):
      key = (index, tuple(np.asarray(tokens).tolist()))
      if key in seen:
        stats['duplicates'] += 1
        return
      seen.add(key)
      if self.max_per_prompt and per_prompt.get(index, 0) >= self.max_per_prompt:
        return
      per_prompt[index] = per_prompt.get(index, 0) + 1
      stats[kind] += 1
      kept.append(record)

    if self.with_gold:
      for r in records:
        gold = completion_ids(self.ctx.tokenizer, r['gold'])
        if (r['index'], tuple(gold.tolist())) not in seen:
          keep(r['index'], {'prompt': r['prompt'], 'completion_tokens': gold}, gold, 'gold')
    for r in records:
      if r['correct']:
        keep(r['index'], r, r['completion_tokens'], 'correct_samples')
    if not kept:
      raise ValueError(f'rft: no correct sample among {len(records)} records (with_gold=False)')
    return kept, {**stats, 'prompts': len(per_prompt)}
