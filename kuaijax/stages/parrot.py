"""Parrot / CaPO stages: Parrot-Ask sessions and context-aware preference pairs.

ask_sessions  the ask model (`policy`) continues the first `opening_turns` turns of
              `num_sessions` sessions of `data` up to `num_turns` turns, the kj_dialog program
              answering (options temperature, max_new_tokens, batch_size); reports how many
              generated queries were well-formed and how many depend on the context.
capo_pairs    for every context-dependent turn of `data` (sessions), one pair per negative kind
              in `kinds` (neglect, hallucination, misunderstanding), at most `limit` sessions.
chat_capo_pairs  the same for real conversations: a chat model (`policy`) answers under each
              context error (`kuaijax.data.chat.corrupted_context`).
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from kuaijax.data import chat, dialog
from kuaijax.data.kj_dialog import record_turns, session_record
from kuaijax.evals import multi_turn
from kuaijax.stages.base import register_stage_type


@register_stage_type('ask_sessions', refs=('policy', 'data'))
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


@register_stage_type('capo_pairs', refs=('data',))
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


@register_stage_type('chat_capo_pairs', refs=('policy', 'data'))
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
