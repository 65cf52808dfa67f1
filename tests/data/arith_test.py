import pytest

from kuaijax.data import arith

GOLD = '[1] 4*5=20\n[2] 20-3=17\nThe answer is 17'


def test_generate_problem_is_deterministic():
  assert arith.generate_problem(0, 7, 3) == arith.generate_problem(0, 7, 3)
  assert arith.generate_problem(0, 7, 3) != arith.generate_problem(0, 8, 3)
  assert arith.generate_problem(0, 7, 3) != arith.generate_problem(1, 7, 3)


@pytest.mark.parametrize('level', arith.LEVELS)
def test_gold_solutions_verify_and_match_answer(level):
  min_steps, max_steps = arith._LEVEL_SPECS[level][:2]
  for index in range(300):
    problem = arith.generate_problem(5, index, level)
    steps = arith.parse_steps(problem.solution)
    assert arith.verify_steps(steps) is None, problem.solution
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    assert len(steps) == problem.steps and min_steps <= problem.steps <= max_steps
    assert steps[-1].result == problem.answer == arith.extract_answer(problem.solution)
    assert all(s.result >= 0 for s in steps)
    assert arith.format_steps(steps, problem.answer) == problem.solution
    assert problem.question.endswith('?') and problem.level == level


def test_generate_problem_rejects_unknown_level():
  with pytest.raises(ValueError, match='level'):
    arith.generate_problem(0, 0, 9)


def test_parse_steps_and_format_round_trip():
  steps = arith.parse_steps(GOLD)
  assert steps == [
    arith.Step(1, '4*5', 20, '[1] 4*5=20'),
    arith.Step(2, '20-3', 17, '[2] 20-3=17'),
  ]
  assert arith.format_steps(steps, 17) == GOLD


def test_parse_steps_keeps_malformed_lines_unparsed():
  steps = arith.parse_steps('[1] 4*5=20\n[2] 20 minus 3 is 17\nso we are done\n\nThe answer is 17')
  assert [s.parsed for s in steps] == [True, False, False]
  assert steps[1].index == 2 and steps[1].expression is None and steps[1].result is None
  assert steps[2].index is None and steps[2].raw == 'so we are done'
  assert arith.format_steps(steps, 17) == (
    '[1] 4*5=20\n[2] 20 minus 3 is 17\nso we are done\nThe answer is 17'
  )


def test_format_steps_renumbers_after_edits():
  steps = arith.parse_steps('[1] 2+2=4\n[2] 4*5=20\n[3] 20-3=17\nThe answer is 17')
  del steps[0]
  assert arith.format_steps(steps, 17) == GOLD


def test_extract_and_check_answer():
  assert arith.extract_answer('The answer is 3. Wait. The answer is 1,234.') == 1234
  assert arith.extract_answer('The answer is -5') == -5
  assert arith.extract_answer('no answer here') is None
  assert arith.check_answer(GOLD, 17)
  assert not arith.check_answer(GOLD, 18)
  assert not arith.check_answer('I do not know', 17)


def test_verify_steps_finds_first_wrong_step_after_edit():
  problem = arith.generate_problem(1, 3, 4)
  steps = arith.parse_steps(problem.solution)
  edited = list(steps)
  edited[2] = arith.Step(3, steps[2].expression, steps[2].result + 1, '')
  edited[4] = arith.Step(5, steps[4].expression, steps[4].result + 2, '')
  assert arith.verify_steps(edited) == 2
  # Re-serialising and parsing the edited solution finds the same step.
  assert arith.verify_steps(arith.parse_steps(arith.format_steps(edited, problem.answer))) == 2
  assert arith.verify_steps(arith.parse_steps('[1] 4*5=20\n[2] 20-3=16\nThe answer is 16')) == 1
  assert arith.verify_steps(arith.parse_steps('[1] 4*5=20\nthen subtract\n[2] 20-3=17')) == 1
  assert arith.verify_steps(arith.parse_steps('[1] 4/5=20')) == 0


@pytest.mark.parametrize(
  'expression, value',
  [('4*5', 20), ('2+3*4', 14), ('(2+3)*4', 20), (' 10 - 2 - 3 ', 5), ('-3+5', 2), ('7', 7)],
)
def test_evaluate(expression, value):
  assert arith.evaluate(expression) == value


@pytest.mark.parametrize(
  'expression', ['4/2', '2**3', '__import__("os")', '(1+2', '1 2', '', 'x+1']
)
def test_evaluate_rejects_anything_else(expression):
  with pytest.raises(ValueError):
    arith.evaluate(expression)


def test_format_prompt():
  assert arith.format_prompt('What is 2+2?') == 'Question: What is 2+2?\nSolution:\n'


def test_generate_splits_are_unique_and_disjoint():
  splits = arith.generate_splits({'train': 3000, 'validation': 300, 'test': 300})
  questions = [p.question for problems in splits.values() for _, p in problems]
  ids = [i for problems in splits.values() for i, _ in problems]
  assert len(set(questions)) == len(questions) == 3600
  assert len(set(ids)) == len(ids)
  assert splits == arith.generate_splits({'train': 3000, 'validation': 300, 'test': 300})
  assert {p.level for _, p in splits['validation']} == set(arith.LEVELS)
