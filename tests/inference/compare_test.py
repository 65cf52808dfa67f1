"""Small pieces of the method comparison and the exit sweep: k checks, prompt widths, settings,
teacher-forced rows. (The evaluations themselves: tests/evals/self_agreement_test.py and
tests/evals/early_exit_test.py.)"""

import pytest

from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.inference import compare, exit_sweep


def test_check_ks():
  assert compare.check_ks((1, 3, 20)) == (1, 3, 20)
  for bad in ((), (0, 3), (True,), (2.0,)):
    with pytest.raises(ValueError, match='ks'):
      compare.check_ks(bad)


def test_prompt_width_rounds_up_to_64_with_bos():
  tok = ByteTokenizer()
  assert compare.prompt_width(tok, ['a' * 63, 'b']) == 64
  assert compare.prompt_width(tok, ['a' * 64]) == 128


def test_exit_settings():
  assert exit_sweep.exit_settings((0.9, 1.0), True, (0.7,)) == [
    ('full', 'confidence', 1.0),
    ('conf_0.9', 'confidence', 0.9),
    ('agreement', 'agreement', 1.0),
    ('gate_0.7', 'gate', 0.7),
  ]
  assert exit_sweep.exit_settings((), False, ()) == [('full', 'confidence', 1.0)]
  with pytest.raises(ValueError, match='threshold'):
    exit_sweep.exit_settings((), False, (0.0,))


def test_teacher_batch_leaves_out_records_that_do_not_fit():
  records = [{'prompt': 'Q: 1+1?\n', 'completion': '2'}, {'prompt': 'Q' * 40, 'completion': 'x'}]
  batch = exit_sweep.teacher_batch(records, ByteTokenizer(), 16)
  assert batch['inputs'].shape == (1, 16) and batch['loss_mask'].sum() == 2  # '2' and eos
  with pytest.raises(ValueError, match='score_len=4'):
    exit_sweep.teacher_batch(records, ByteTokenizer(), 4)
