"""Answer extraction per answer type against hand-written cases."""

import pytest

from kuaijax.inference.answers import extract_answer, normalise_number


@pytest.mark.parametrize(
  'text, expected',
  [
    ('[1] 4*5=20\n[2] 20-3=17\nThe answer is 17', '17'),
    ('The answer is 1,234 apples.', '1234'),
    ('The answer is 5.0', '5'),
    ('The answer is -3.', '-3'),
    ('The answer is 2.5 km', '2.5'),
    ('The answer is 3. Wait.\nThe answer is 4', '4'),  # the last trigger wins
    ('so 7 + 8 = 15 apples', '15'),  # no trigger: the last number
    ('The answer is unknown', None),  # trigger without a number
    ('no digits here', None),
    ('', None),
  ],
)
def test_number(text, expected):
  assert extract_answer(text, 'number') == expected


@pytest.mark.parametrize(
  'text, mode, expected',
  [
    ('The answer is (B).', 'clean', 'B'),
    ('The answer is C because it is warm.', 'clean', 'C'),
    ('Among (A) and (D), (D) fits. I agree.', 'clean', 'D'),  # bracketed letters first
    ('I think it is E.', 'clean', 'E'),  # bare letters: A-E only, so the pronoun I is no option
    ('Option (C) fits best.', 'trigger', None),  # trigger mode ignores text without the trigger
    ('The answer is none of these', 'clean', None),
  ],
)
def test_choice(text, mode, expected):
  assert extract_answer(text, 'choice', mode=mode) == expected


@pytest.mark.parametrize(
  'text, expected',
  [
    ('The answer is Yes.', 'yes'),
    ('The answer is no, because...', 'no'),
    ('Nobody knows; yes, it can. No wait, it cannot: no.', 'no'),  # whole words, the last one
    ('The answer is maybe', None),
  ],
)
def test_yes_no(text, expected):
  assert extract_answer(text, 'yes_no') == expected


@pytest.mark.parametrize(
  'text, expected',
  [
    ('The answer is  Blue   Whale.', 'blue whale'),
    ('Let me think.\nParis is the capital.\n\n', 'paris is the capital'),  # the last line
    ('The answer is .', None),
  ],
)
def test_text(text, expected):
  assert extract_answer(text, 'text') == expected


def test_custom_trigger_and_number_normalisation():
  assert extract_answer('So the result is 12.', 'number', trigger='the result is') == '12'
  assert normalise_number('-.5') == '-0.5' and normalise_number('x') is None


def test_bad_arguments():
  with pytest.raises(ValueError, match='answer_type'):
    extract_answer('The answer is 3', 'integer')
  with pytest.raises(ValueError, match='mode'):
    extract_answer('The answer is 3', mode='regex')
  with pytest.raises(ValueError, match='trigger'):
    extract_answer('The answer is 3', trigger='')
