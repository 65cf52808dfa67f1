"""SFT: next-token cross-entropy on the completions of (prompt, completion) records, packed rows.

Records: `prompt` text and the completion, as stored tokens `completion_tokens` (a model's own
sample) or as `completion` text (encoded with eos). Loss options (`<stage>.loss`) go to
`kuaijax.train.lm_task.lm_loss_fn` (z_loss, aux_weights, aux_reduce).
"""

from __future__ import annotations

from collections.abc import Sequence

from kuaijax.data import sequences
from kuaijax.methods.base import Method, register_method, tokens_or_text
from kuaijax.train import lm_task


@register_method('sft')
class SFT(Method):
  def __init__(self, ctx, *, loss=None):
    super().__init__(ctx, loss=loss)
    self._loss_fn = lm_task.lm_loss_fn(**self.loss)

  def select(self, records: Sequence[dict]) -> tuple[list[dict], dict]:
    """The records to train on (all of them; subclasses filter)."""
    return list(records), {}

  def examples(self, records):
    chosen, stats = self.select(records)
    tok, seq_len = self.ctx.tokenizer, self.ctx.seq_len
    encoded, dropped = [], 0
    for r in chosen:
      prompt = sequences.prompt_ids(tok, r['prompt'])
      completion = tokens_or_text(r, 'completion', tok)
      n = len(prompt) + len(completion)
      if n > seq_len:
        dropped += 1
        continue
      encoded.append(sequences.encode_sequence(prompt, completion, n, tok.pad_id))
    rows = sequences.pack_sequences(encoded, seq_len, tok.pad_id, pack=self.ctx.pack)
    return rows, {**stats, 'examples': len(encoded), 'dropped_too_long': dropped, 'rows': len(rows)}

  def loss_fn(self, model, batch, rng, frozen=None):
    return self._loss_fn(model, batch, rng)
