"""RLMEC's non-model stages (teacher, grm_data, programmatic rewards) on hand-made samples."""

import types

import ml_collections
import numpy as np
import pytest

from kuaijax import grm
from kuaijax.data import records as records_lib
from kuaijax.data import sequences, tokenizers
from kuaijax.stages import rlmec
from kuaijax.stages.base import Stage

TOK = tokenizers.ByteTokenizer()
GOLD = '[1] 4*5=20\n[2] 20-3=17\nThe answer is 17'
RIGHT = GOLD
WRONG = '[1] 4*5=20\n[2] 20-3=18\nThe answer is 18'
WORSE = '[1] 4*5=21\n[2] 21-3=18\nThe answer is 18'


def sample(index, completion):
  tokens = sequences.completion_ids(TOK, completion)
  return {
    'question': f'q{index}',
    'prompt': f'Question: q{index}\nSolution:\n',
    'answer': 17,
    'level': 1,
    'gold': GOLD,
    'index': index,
    'completion': completion,
    'completion_tokens': tokens,
    'logprobs': np.full(len(tokens), -0.5, np.float32),
    'correct': completion == RIGHT,
  }


def run_stage(fn, tmp_path, done, name, **block):
  pipeline = types.SimpleNamespace(
    config=ml_collections.ConfigDict(dict(stage={name: block})), tokenizer=TOK, task=None
  )
  (tmp_path / name).mkdir()
  stage = Stage(name, ml_collections.ConfigDict(block), pipeline, str(tmp_path / name), 0, done)
  summary = fn(stage)
  done[name] = {**stage.outputs, 'summary': summary, 'dir': str(tmp_path / name)}
  return summary, records_lib.read_records(str(tmp_path / name / 'data.jsonl'))


def test_teacher_grm_data_and_programmatic_rewards(tmp_path):
  samples = [sample(0, RIGHT), sample(0, RIGHT), sample(0, WRONG), sample(1, WORSE)]
  (tmp_path / 'samples').mkdir()
  records_lib.write_records(str(tmp_path / 'samples' / 'data.jsonl'), samples)
  done = {'samples': {'data': 'data.jsonl', 'dir': str(tmp_path / 'samples')}}
  summary, teacher = run_stage(
    rlmec.teacher_stage, tmp_path, done, 'teacher', data='samples', teacher='program', compare=''
  )
  assert [t['error_step'] for t in teacher] == [0, 0, 2, 1]
  assert [t['rewrite'] for t in teacher] == [RIGHT, RIGHT, GOLD, GOLD]
  assert summary['notes'] == {'correct': 2, 'rewritten': 2} and summary['rewrite_success'] == 1.0

  # the teacher compared with itself: perfect quality, edit ratio 1
  quality = rlmec.grm_quality(teacher, teacher, TOK)
  assert (
    quality['locate_accuracy'] == quality['rewrite_success'] == quality['edit_distance_ratio'] == 1
  )
  assert quality['edit_distance'] == (2 + 4) / 2  # substituted digits: 8, 8 and 1, 1, 8, 8

  summary, grm_data = run_stage(rlmec.grm_data_stage, tmp_path, done, 'grm_data', data='teacher')
  assert [r['task'] for r in grm_data][:4] == ['locate', 'rewrite', 'locate', 'rewrite']
  assert grm_data[0]['completion'] == 'The first error step is [2]'
  assert grm_data[3]['completion'] == GOLD
  assert summary['rewritten'] == 2 and summary['correct'] == 2

  summary, rewards = run_stage(
    rlmec.rewards_stage,
    tmp_path,
    done,
    'rewards',
    data='teacher',
    grm='',
    auc_data='teacher',
    batch_size=4,
    max_len=512,
  )
  # the duplicate correct sample is dropped; the rest are used
  assert summary['used'] == 3 and summary['duplicates'] == 1 and summary['dropped_unreached'] == 0
  right, wrong, worse = rewards
  np.testing.assert_array_equal(right['rewards'], np.full(len(RIGHT) + 1, 0.5))
  # WRONG -> GOLD changes the '8' of step 2 and the '8' of the answer: r = -0.1 there, 0 elsewhere
  bad = np.zeros(len(WRONG) + 1)
  bad[[i for i, c in enumerate(WRONG) if c == '8']] = -0.1
  np.testing.assert_allclose(wrong['rewards'], bad, atol=1e-6)
  np.testing.assert_array_equal(wrong['rewrite_tokens'], sequences.completion_ids(TOK, GOLD))
  assert (
    worse['rewards'][9] == pytest.approx(-0.1) and worse['rewards'][0] == 0
  )  # '1' of 21 changes
  assert summary['reward_auc'] == 1.0  # the programmatic rewards mark exactly the changed tokens
  assert grm.reward_auc([np.asarray(wrong['rewards'])], [np.asarray(wrong['rewards']) < 0]) == 1.0
