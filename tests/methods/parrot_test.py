import types

import ml_collections
import pytest

from kuaijax.data import dialog, tokenizers
from kuaijax.methods import get_method, parrot
from kuaijax.methods.base import MethodContext

TOK = tokenizers.ByteTokenizer()
SESSIONS = [dialog.generate_session(0, i, num_turns=4) for i in range(6)]
RECORDS = [parrot.session_record(s) for s in SESSIONS]


def _ctx(seq_len=256):
  return MethodContext(
    tokenizer=TOK, task=None, seq_len=seq_len, prompt_len=seq_len, max_new_tokens=32, pack=False
  )


def _scored_text(row):
  return TOK.decode(row['targets'][row['loss_mask'] > 0])


def test_ask_loss_is_on_user_turns_only():
  rows, stats = get_method('chat_sft')(_ctx(), loss_on='user').examples(RECORDS)
  assert stats['examples'] == len(RECORDS) and stats['too_long'] == 0
  for row, session in zip(rows, SESSIONS, strict=True):
    assert _scored_text(row) == ''.join(f'User: {t.user}\n' for t in session)
  rows, _ = get_method('chat_sft')(_ctx()).examples(RECORDS)
  for row, session in zip(rows, SESSIONS, strict=True):
    assert _scored_text(row) == ''.join(f'Assistant: {t.assistant}\n' for t in session)
    scored_targets = row['targets'][row['loss_mask'] > 0]
    assert (scored_targets == TOK.eos_id).sum() == len(session)


def test_short_sessions_and_truncation():
  rows, _ = get_method('chat_sft')(_ctx(), max_turns=2).examples(RECORDS)
  assert [_scored_text(r).count('Assistant: ') for r in rows] == [1, 2, 1, 2, 1, 2]
  long = max(RECORDS, key=lambda r: len(str(r['messages'])))
  rows, stats = get_method('chat_sft')(_ctx(seq_len=96)).examples([long])
  assert stats['truncated_from_oldest'] == 1 and stats['too_long'] == 0
  assert not _scored_text(rows[0]).startswith(f'Assistant: {long["messages"][1]["content"]}\n')
  with pytest.raises(ValueError, match='loss_on'):
    get_method('chat_sft')(_ctx(), loss_on='everything')


def test_capo_pairs_stage_and_chat_capo_layout():
  written = {}
  stage = types.SimpleNamespace(
    name='pairs',
    block=ml_collections.ConfigDict(dict(data='task:train', kinds=('neglect',), limit=4)),
    records=lambda ref: RECORDS,
    write_data=lambda records: written.setdefault('pairs', records),
  )
  summary = parrot.capo_pairs_stage(stage)
  pairs = written['pairs']
  dependent = sum(t.context_dependent for s in SESSIONS[:4] for t in s)
  assert summary['pairs'] == len(pairs) == dependent - summary['no_negative']['neglect']
  examples, stats = get_method('chat_capo')(_ctx(), loss={'beta': 0.1}).examples(pairs)
  assert stats == {'pairs': len(pairs), 'too_long': 0, 'truncated_from_oldest': 0}
  for pair, ex in zip(pairs, examples, strict=True):
    history = ''.join(
      f'{m["role"].capitalize()}: {m["content"]}\n' + ('\x00' if m['role'] == 'assistant' else '')
      for m in pair['messages']
    )
    for side in ('chosen', 'rejected'):
      tokens, mask = ex[f'{side}_tokens'], ex[f'{side}_mask']
      real = tokens[tokens != TOK.pad_id]
      text = ''.join('\x00' if t == TOK.eos_id else TOK.decode([t]) for t in real[1:])
      assert text == f'{history}Assistant: {pair[side]}\n\x00'
      assert TOK.decode(tokens[1:][mask[:-1] > 0]) == f'{pair[side]}\n'  # only the final answer


def test_session_records_are_checked():
  assert parrot.record_turns(RECORDS[0]) == SESSIONS[0]
  bad = {**RECORDS[0], 'messages': [dict(m) for m in RECORDS[0]['messages']]}
  bad['messages'][1]['content'] = '99'
  with pytest.raises(ValueError, match='not the program answers'):
    parrot.record_turns(bad)
