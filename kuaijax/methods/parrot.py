"""Parrot / CaPO (arXiv 2310.07301): multi-turn chat training, and the Parrot-Ask query model.

Methods (records carry `messages`, laid out by `kuaijax.data.chat`):
  chat_sft   LM loss on a conversation's assistant turns (options: loss_on 'assistant' |
             'last_assistant' | 'user', max_turns: cut every session to its first 1..max_turns
             turns, alternating 1, 2, ..., 0 = keep all). loss_on='user' is Parrot-Ask: the loss
             falls on the user queries only. Longer conversations lose their oldest exchanges.
  chat_capo  CaPO: sigmoid DPO (`capo_loss`) on records {'messages' ending with the query,
             'chosen', 'rejected'}; the prompt is the history + query in the chat layout, only the
             final answer is scored; the reference is the SFT model (the `capo` objective).
The stages that write Parrot-Ask sessions and CaPO pairs are in `kuaijax.stages.parrot`.
The task 'kj_dialog' (`kuaijax.data.tasks`) gives the kj_dialog sessions as records with `messages`.
"""

from __future__ import annotations

from kuaijax.config_lib import check_choice
from kuaijax.data import chat, sequences
from kuaijax.methods.base import Method, register_method
from kuaijax.methods.dpo import CaPO
from kuaijax.train import lm_task


@register_method('chat_sft')
class ChatSFT(Method):
  """LM loss on the chosen turns of whole conversations, packed rows (see the module docstring)."""

  def __init__(self, ctx, *, loss=None, loss_on: str = 'assistant', max_turns: int = 0):
    super().__init__(ctx, loss=loss)
    check_choice('chat_sft loss_on', loss_on, chat.LOSS_ON)
    if max_turns < 0:
      raise ValueError(f'chat_sft max_turns must be >= 0, got {max_turns}')
    self.loss_on, self.max_turns = loss_on, max_turns
    self._loss_fn = lm_task.lm_loss_fn(**self.loss)

  def _cut(self, messages: list[dict], index: int) -> list[dict]:
    """The first 1..max_turns exchanges (alternating by record index), all when max_turns is 0."""
    if not self.max_turns:
      return messages
    start = 1 if messages[0]['role'] == 'system' else 0
    keep = 1 + index % self.max_turns
    return messages[: start + 2 * keep]

  def examples(self, records):
    tok, seq_len = self.ctx.tokenizer, self.ctx.seq_len
    sequences_, too_long, truncated = [], 0, 0
    for index, record in enumerate(records):
      example = chat.chat_example(
        self._cut(record['messages'], index), tok, seq_len=seq_len, loss_on=self.loss_on
      )
      if example is None:
        too_long += 1
        continue
      truncated += example.dropped_exchanges > 0
      n = example.length
      sequences_.append((example.tokens[:n], example.mask[:n]))
    rows = sequences.pack_sequences(sequences_, seq_len, tok.pad_id, pack=self.ctx.pack)
    return rows, {
      'examples': len(sequences_),
      'too_long': too_long,
      'truncated_from_oldest': truncated,
      'rows': len(rows),
    }

  def loss_fn(self, model, batch, rng, frozen=None):
    return self._loss_fn(model, batch, rng)


@register_method('chat_capo')
class ChatCaPO(CaPO):
  """CaPO on chat records: prompt = history + query in the chat layout, final answer scored."""

  def examples(self, records):
    out, too_long, truncated = [], 0, 0
    for record in records:
      example, dropped = chat.chat_pair_example(record, self.ctx.tokenizer, self.ctx.seq_len)
      if example is None:
        too_long += 1
        continue
      truncated += dropped > 0
      out.append(example)
    return out, {'pairs': len(out), 'too_long': too_long, 'truncated_from_oldest': truncated}
