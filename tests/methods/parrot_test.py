import types

import ml_collections
import pytest

from kuaijax.data import dialog, kj_dialog, tokenizers
from kuaijax.methods import get_method
from kuaijax.methods.base import MethodContext
from kuaijax.stages import parrot as parrot_stages

TOK = tokenizers.ByteTokenizer()
SESSIONS = [dialog.generate_session(0, i, num_turns=4) for i in range(6)]
RECORDS = [kj_dialog.session_record(s) for s in SESSIONS]


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
  summary = parrot_stages.capo_pairs_stage(stage)
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
  assert kj_dialog.record_turns(RECORDS[0]) == SESSIONS[0]
  bad = {**RECORDS[0], 'messages': [dict(m) for m in RECORDS[0]['messages']]}
  bad['messages'][1]['content'] = '99'
  with pytest.raises(ValueError, match='not the program answers'):
    kj_dialog.record_turns(bad)


def test_chat_capo_pairs_for_real_conversations_with_a_small_model():
  import contextlib
  import pathlib

  from flax import nnx

  from kuaijax.data import chat_files
  from kuaijax.evals import multi_turn
  from kuaijax.jit_cache import split_params
  from kuaijax.models.transformer import Transformer, TransformerConfig

  fixture = pathlib.Path(__file__).parents[1] / 'data/fixtures/sharegpt_train.json'
  records, _ = chat_files.load_sharegpt(fixture)
  model = Transformer(
    TransformerConfig(vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, d_ff=32),
    rngs=nnx.Rngs(0),
  )
  written = {}
  stage = types.SimpleNamespace(
    name='real_pairs',
    block=ml_collections.ConfigDict(
      dict(
        policy='chat',
        data='sharegpt',
        kinds=('neglect', 'misunderstanding'),
        limit=0,
        max_new_tokens=4,
        batch_size=2,
      )
    ),
    records=lambda ref: records,
    seed=lambda: 0,
    load_model=lambda ref: split_params(model),
    config=ml_collections.ConfigDict(dict(data=dict(seq_len=256))),
    tokenizer=TOK,
    axis_rules=contextlib.nullcontext,
    write_data=lambda data: written.setdefault('pairs', data),
  )
  summary = parrot_stages.chat_capo_pairs_stage(stage)
  # Only the Hamlet conversation has a turn after its first exchange; misunderstanding needs two
  # earlier exchanges, so one neglect pair.
  (pair,) = written['pairs']
  assert summary == {'conversations': 3, 'pairs': 1, 'same_as_chosen': 0, 'truncated_prompts': 0}
  assert pair['messages'] == records[0]['messages'][:3] and pair['negative'] == 'neglect'
  assert pair['chosen'] == records[0]['messages'][3]['content']
  expected, _ = multi_turn.generate_turns(
    model,
    TOK,
    [[records[0]['messages'][2]]],
    max_prompt_len=252,
    max_new_tokens=4,
    batch_size=2,
    width_multiple=252,
  )
  assert pair['rejected'] == expected[0]  # the model's answer to the query alone
