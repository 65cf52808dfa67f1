"""Parrot / CaPO (arXiv 2310.07301): multi-turn chat training, the Parrot-Ask query model, and the
stages that write Parrot-Ask sessions and context-aware preference pairs.

Methods (records carry `messages`, laid out by `kuaijax.data.chat`):
  chat_sft   LM loss on a conversation's assistant turns (options: loss_on 'assistant' |
             'last_assistant' | 'user', max_turns: cut every session to its first 1..max_turns
             turns, alternating 1, 2, ..., 0 = keep all). loss_on='user' is Parrot-Ask: the loss
             falls on the user queries only. Longer conversations lose their oldest exchanges.
  chat_capo  CaPO: sigmoid DPO (`capo_loss`) on records {'messages' ending with the query,
             'chosen', 'rejected'}; the prompt is the history + query in the chat layout, only the
             final answer is scored; the reference is the SFT model (the `capo` objective).
Stage types:
  ask_sessions  the ask model (`policy`) continues the first `opening_turns` turns of
                `num_sessions` sessions of `data` up to `num_turns` turns, the kj_dialog program
                answering (options temperature, max_new_tokens, batch_size); reports how many
                generated queries were well-formed and how many depend on the context.
  capo_pairs    for every context-dependent turn of `data` (sessions), one pair per negative kind
                in `kinds` (neglect, hallucination, misunderstanding), at most `limit` sessions.
  chat_capo_pairs  the same for real conversations: a chat model (`policy`) answers under each
                context error (`kuaijax.data.chat.corrupted_context`).
The task 'kj_dialog' gives the kj_dialog sessions as records with `messages`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import nnx

from kuaijax.config_lib import check_choice
from kuaijax.data import chat, dialog, sequences, tasks
from kuaijax.evals import multi_turn
from kuaijax.methods.base import Method, register_method
from kuaijax.methods.dpo import CaPO, pair_example
from kuaijax.train import lm_task
from kuaijax.train.stages import register_stage_type


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


def load_kj_dialog(split: str, *, data_dir: str = '', limit: int = 0, **unused) -> list[dict]:
  """kj_dialog sessions of one split as records (at most `limit`; 0 = all)."""
  del unused
  return [
    session_record(s) for s in multi_turn.load_sessions(split, limit=limit, data_dir=data_dir)
  ]


def _per_turn_only(text: str, record: dict) -> bool:
  del text, record
  raise ValueError('kj_dialog is scored turn by turn: use the kj_dialog8 evaluator')


tasks.register_task('kj_dialog', tasks.Task(load=load_kj_dialog, is_correct=_per_turn_only))


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
      example = chat.encode_chat(
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
    tok, seq_len = self.ctx.tokenizer, self.ctx.seq_len
    out, too_long, truncated = [], 0, 0
    for record in records:
      sides = [chat.answer_ids(tok, record[side]) for side in ('chosen', 'rejected')]
      room = seq_len - max(len(side) for side in sides)
      prompt = chat.encode_prompt(record['messages'], tok, next_role='assistant', max_len=room)
      example = None if prompt is None else pair_example(prompt[0], *sides, seq_len, tok.pad_id)
      if example is None:
        too_long += 1
        continue
      truncated += prompt[1] > 0
      out.append(example)
    return out, {'pairs': len(out), 'too_long': too_long, 'truncated_from_oldest': truncated}


@register_stage_type('ask_sessions')
def ask_sessions_stage(stage) -> dict:
  """Options: policy (the ask model), data (sessions whose first `opening_turns` turns open the
  generated ones), num_sessions, num_turns, temperature, max_new_tokens, batch_size. Writes
  kj_dialog session records answered by the program."""
  b = stage.block
  sources_ = stage.records(b.data)
  if len(sources_) < b.num_sessions:
    raise ValueError(
      f'stage {stage.name}: {b.data} has {len(sources_)} sessions, fewer than num_sessions'
    )
  openings = [
    [m['content'] for m in r['messages'] if m['role'] == 'user'][: b.opening_turns]
    for r in sources_[: b.num_sessions]
  ]
  graphdef, params = stage.load_model(b.policy)
  max_prompt_len = stage.config.data.seq_len - b.max_new_tokens
  asker = multi_turn.ModelAnswerer(
    nnx.merge(graphdef, params),
    stage.tokenizer,
    next_role='user',
    max_prompt_len=max_prompt_len,
    width_multiple=max_prompt_len,  # one prompt width: one compiled program
    max_new_tokens=b.max_new_tokens,
    batch_size=b.batch_size,
    temperature=b.temperature,
    seed=stage.seed(),
  )
  with stage.axis_rules():
    sessions, stats = dialog.oracle_sessions(asker, openings, num_turns=b.num_turns)
  stage.write_data([session_record(s) for s in sessions])
  return {**stats, 'truncated_prompts': asker.truncated}


@register_stage_type('capo_pairs')
def capo_pairs_stage(stage) -> dict:
  """Options: data (sessions: a stage or 'task:<split>'), kinds, limit (sessions; 0 = all)."""
  b = stage.block
  records = stage.records(b.data)
  records = records[: b.limit] if b.limit else records
  pairs, missing = dialog.capo_pairs([record_turns(r) for r in records], kinds=tuple(b.kinds))
  if not pairs:
    raise RuntimeError(f'stage {stage.name}: no context-dependent turn gave a pair')
  stage.write_data(pairs)
  counts = {k: sum(p['negative'] == k for p in pairs) for k in b.kinds}
  return {
    'sessions': len(records),
    'pairs': len(pairs),
    'pairs_by_kind': counts,
    'no_negative': missing,
  }


@register_stage_type('chat_capo_pairs')
def chat_capo_pairs_stage(stage) -> dict:
  """CaPO pairs for real conversations (records with `messages`, e.g. 'sharegpt:' data).

  Options: policy (the chat model that answers under a context error), data, kinds, limit
  (conversations; 0 = all), max_new_tokens, batch_size. Every assistant turn after the first
  exchange gives one pair per kind: chosen = the conversation's own answer, rejected = the policy's
  greedy answer to the same query under `chat.corrupted_context` (misunderstanding needs two earlier
  exchanges). Real data carries no context-dependence labels, so every later turn is used.
  """
  b = stage.block
  records = stage.records(b.data)
  records = records[: b.limit] if b.limit else records
  rng = np.random.default_rng(stage.seed())
  prompts, pairs = [], []
  for record in records:
    messages = record['messages']
    start = 1 if messages[0]['role'] == 'system' else 0
    for end in range(start + 2, len(messages) - 1, 2):
      history, answer = messages[: end + 1], messages[end + 1]['content']
      for kind in b.kinds:
        if kind == 'misunderstanding' and end - start < 4:
          continue
        prompts.append(chat.corrupted_context(history, kind, rng))
        pairs.append({'messages': history, 'chosen': answer, 'negative': kind})
  if not pairs:
    raise RuntimeError(f'stage {stage.name}: no conversation has a turn after its first exchange')
  graphdef, params = stage.load_model(b.policy)
  max_prompt_len = stage.config.data.seq_len - b.max_new_tokens
  with stage.axis_rules():
    replies, truncated = multi_turn.generate_turns(
      nnx.merge(graphdef, params),
      stage.tokenizer,
      prompts,
      max_prompt_len=max_prompt_len,
      max_new_tokens=b.max_new_tokens,
      batch_size=b.batch_size,
      width_multiple=max_prompt_len,
    )
  kept = [{**p, 'rejected': r} for p, r in zip(pairs, replies, strict=True) if r != p['chosen']]
  stage.write_data(kept)
  return {
    'conversations': len(records),
    'pairs': len(kept),
    'same_as_chosen': len(pairs) - len(kept),
    'truncated_prompts': truncated,
  }
