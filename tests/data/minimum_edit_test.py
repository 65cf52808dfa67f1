import random

import pytest

from kuaijax.data import arith, minimum_edit
from kuaijax.data.minimum_edit import Case, Edit

GOLD = '[1] 4*5=20\n[2] 20-3=17\nThe answer is 17'


def case(prediction: str) -> Case:
  return Case(
    'Tom has 4 bags of 5 coins. He gives away 3. How many are left?', GOLD, '17', prediction
  )


# (prediction, first wrong step k, rewrite): hand-made truths on kj_arith.
CASES = [
  # arithmetic right, result off the gold path at step 2
  ('[1] 4*5=20\n[2] 20-3=18\nThe answer is 18', 2, GOLD),
  # a reordered but equal step 1 is kept verbatim (minimum editing)
  ('[1] 5*4=20\n[2] 20-3=16\nThe answer is 16', 2, '[1] 5*4=20\n[2] 20-3=17\nThe answer is 17'),
  # wrong arithmetic at step 1
  ('[1] 4*5=21\n[2] 21-3=18\nThe answer is 18', 1, GOLD),
  # right arithmetic on the wrong numbers at step 1
  ('[1] 4*6=24\n[2] 24-3=21\nThe answer is 21', 1, GOLD),
  # only the answer line is wrong
  ('[1] 4*5=20\n[2] 20-3=17\nThe answer is 71', 3, GOLD),
  # cut off after correct steps: the missing answer line is step 3 = len(steps) + 1
  ('[1] 4*5=20\n [2] 20-3=17 ', 3, GOLD),
  # an extra step where the answer line belongs
  ('[1] 4*5=20\n[2] 20-3=17\n[3] 17+1=18\nThe answer is 18', 3, GOLD),
  # an unparsed line
  ('[1] 4*5=20\n[2] twenty minus 3\nThe answer is 5', 2, GOLD),
  # nothing usable
  ('', 1, GOLD),
]


@pytest.mark.parametrize('prediction, k, rewrite', CASES)
def test_program_teacher(prediction, k, rewrite):
  c = case(prediction)
  assert not c.correct
  assert minimum_edit.ProgramTeacher.first_error(c) == k
  (edit,) = minimum_edit.ProgramTeacher()([c])
  assert edit == Edit(k, rewrite, 'rewritten' if prediction else 'no_steps')
  assert minimum_edit.reaches_gold(c, edit)
  # steps 1..k-1 are copied verbatim
  assert minimum_edit.steps(edit.rewrite)[: k - 1] == minimum_edit.steps(prediction)[: k - 1]


def test_correct_samples_are_kept():
  prediction = '[1] 5*4=20\n[2] 20-3=17\nThe answer is 17'
  (edit,) = minimum_edit.ProgramTeacher()([case(prediction)])
  assert edit == Edit(0, prediction, 'correct')


def test_program_teacher_on_corrupted_problems():
  """Corrupting gold step j (and the answer) of generated problems gives k = j and the gold rewrite."""
  rng = random.Random(0)
  for index in range(40):
    problem = arith.generate_problem(0, index, 1 + index % 4)
    gold = arith.parse_steps(problem.solution)
    j = rng.randrange(len(gold))
    lines = minimum_edit.steps(problem.solution)
    lines[j] = f'[{j + 1}] {gold[j].expression}={gold[j].result + 1}'
    lines[-1] = f'The answer is {problem.answer + 1}'
    c = Case(problem.question, problem.solution, str(problem.answer), '\n'.join(lines))
    (edit,) = minimum_edit.ProgramTeacher()([c])
    assert edit.error_step == j + 1 and edit.rewrite == '\n'.join(
      minimum_edit.steps(problem.solution)
    )


def test_number_steps_and_prefix():
  text = '[1] 4*5=20\n\n  [2] 20-3=17\nThe answer is 17\n'
  assert minimum_edit.number_steps(text) == '[1] 4*5=20\n[2] 20-3=17\n[3] The answer is 17'
  assert minimum_edit.number_steps('a\nb') == '[1] a\n[2] b'
  assert minimum_edit.copy_prefix(text, 3) == '[1] 4*5=20\n[2] 20-3=17'
  assert minimum_edit.copy_prefix(text, 1) == ''
  assert minimum_edit.join_rewrite('', ' x\n') == 'x'
  assert minimum_edit.join_rewrite('a', 'b\n') == 'a\nb'


@pytest.mark.parametrize(
  'text, num_steps, expected',
  [
    ('The first error step is [2]', 3, (2, 'rewritten')),
    ('The first error step is [4] and more', 3, (4, 'rewritten')),
    ('The first error step is [5]', 3, (4, 'locate_out_of_range')),
    ('The first error step is [0]', 3, (1, 'locate_out_of_range')),
    ('The first error step is [x]', 3, (1, 'locate_unparsed')),
    ('[2]', 3, (1, 'locate_unparsed')),
    ('', 0, (1, 'locate_unparsed')),
  ],
)
def test_parse_locate(text, num_steps, expected):
  assert minimum_edit.parse_locate(text, num_steps) == expected


def test_grm_prompt_formats():
  c = case('[1] 4*5=20\n[2] 20-3=18\nThe answer is 18')
  prompts = minimum_edit.GrmPrompts()
  assert prompts.locate_prompt(c) == (
    'Locate the first wrong step.\n'
    f'Problem: {c.question}\n'
    'Correct solution:\n[1] 4*5=20\n[2] 20-3=17\n[3] The answer is 17\n'
    'Prediction:\n[1] 4*5=20\n[2] 20-3=18\n[3] The answer is 18\n'
  )
  assert prompts.rewrite_prompt(c) == (
    'Correct the prediction with minimal edits.\n'
    f'Problem: {c.question}\n'
    f'Correct solution:\n{GOLD}\n'
    'Prediction:\n[1] 4*5=20\n[2] 20-3=18\nThe answer is 18\n'
    'Correct prediction:'
  )
  assert minimum_edit.locate_target(2) == 'The first error step is [2]'


def test_grm_examples():
  wrong = [case(p) for p, _, _ in CASES[:2]]
  unusable = case('[1] 4*5=20\n[2] 20-3=18\nThe answer is 18')
  right = [case(f'[1] 4*5=20\n[2] 20-3=17\nThe answer is 17{" " * i}') for i in range(3)]
  cases = [right[0], *wrong, unusable, *right[1:]]
  teacher = minimum_edit.ProgramTeacher()
  edits = teacher(cases)
  edits[3] = Edit(2, '[1] 4*5=20\n[2] 20-3=16\nThe answer is 16', 'rewritten')  # misses gold
  examples, stats = minimum_edit.grm_examples(cases, edits, seed=3)
  # copy probability #rewritten / #samples = 2 / 6, one draw per correct sample, in order
  draws = random.Random(3)
  copies = [c for c in (right[0], *right[1:]) if draws.random() < 2 / 6]
  assert stats == {
    'samples': 6,
    'rewritten': 2,
    'unusable': 1,
    'correct': 3,
    'copy': len(copies),
    'examples': 4 + len(copies),
  }
  prompts = minimum_edit.GrmPrompts()
  expected = []
  for c in wrong:
    edit = teacher.edit(c)
    expected += [
      {
        'prompt': prompts.locate_prompt(c),
        'target': f'The first error step is [{edit.error_step}]',
        'task': 'locate',
      },
      {'prompt': prompts.rewrite_prompt(c), 'target': edit.rewrite, 'task': 'rewrite'},
    ]
  expected += [
    {'prompt': prompts.rewrite_prompt(c), 'target': c.prediction, 'task': 'copy'} for c in copies
  ]
  assert examples == expected


def test_copy_rate():
  """With many correct samples the copy fraction approaches #rewritten / #samples."""
  wrong = case('[1] 4*5=20\n[2] 20-3=18\nThe answer is 18')
  right = case(GOLD)
  cases = [wrong] * 300 + [right] * 900
  _, stats = minimum_edit.grm_examples(cases, minimum_edit.ProgramTeacher()(cases), seed=0)
  assert stats['rewritten'] == 300 and abs(stats['copy'] / 900 - 0.25) < 0.05


def test_usable_samples():
  right = '[1] 4*5=20\n[2] 20-3=17\nThe answer is 17'
  wrong = '[1] 4*5=20\n[2] 20-3=18\nThe answer is 18'
  cases = [
    case(right),
    case(right.replace('\n', ' \n') + '.'),
    case(wrong),
    case(wrong),
    case(right),
  ]
  edits = minimum_edit.ProgramTeacher()(cases)
  edits[3] = Edit(2, wrong, 'unchanged')  # a rewrite that misses the gold answer
  ids = ['a', 'a', 'a', 'b', 'c']
  keep, stats = minimum_edit.usable_samples(ids, cases, edits)
  assert keep == [0, 2, 4]
  assert stats == {
    'samples': 5,
    'correct': 2,
    'wrong': 1,
    'dropped_unreached': 1,
    'duplicates': 1,
    'problems_without_sample': 1,
    'used': 3,
  }
