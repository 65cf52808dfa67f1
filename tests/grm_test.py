import itertools

import numpy as np
import pytest
from flax import nnx

from kuaijax import grm, sampling
from kuaijax.data import minimum_edit, sequences, tokenizers
from kuaijax.data.minimum_edit import Case, Edit
from kuaijax.models.transformer import Transformer, TransformerConfig

TOK = tokenizers.ByteTokenizer()
GOLD = '[1] 4*5=20\n[2] 20-3=17\nThe answer is 17'
QUESTION = 'Tom has 4 bags of 5 coins. He gives away 3. How many are left?'


@pytest.fixture(scope='module')
def model():
  config = TransformerConfig(
    vocab_size=TOK.vocab_size, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32
  )
  return Transformer(config, rngs=nnx.Rngs(0))


def case(prediction):
  return Case(QUESTION, GOLD, '17', prediction)


def test_token_rewards_formula():
  p = np.array([1.0, 0.9, 0.55, 0.5, 0.45, 0.3, 0.0])
  wrong, right = grm.token_rewards([p, p[:3]], [False, True])
  np.testing.assert_allclose(wrong, [0, 0, 0, 0, -0.05, -0.1, -0.1], atol=1e-6)
  np.testing.assert_allclose(right, [0.5, 0.4, 0.05], atol=1e-6)
  assert grm.token_rewards([], []) == []


def test_changed_tokens_and_edit_distance():
  np.testing.assert_array_equal(grm.changed_tokens([1, 2, 3, 4], [1, 3, 4]), [0, 1, 0, 0])
  np.testing.assert_array_equal(grm.changed_tokens([1, 2, 3], [1, 2, 3]), [0, 0, 0])
  rng = np.random.default_rng(1)

  def reference(a, b):  # plain O(nm) DP
    d = np.arange(len(b) + 1)
    for i, x in enumerate(a, 1):
      prev, d[0] = d.copy(), i
      for j, y in enumerate(b, 1):
        d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
    return int(d[-1])

  for _ in range(30):
    a, b = rng.integers(0, 4, rng.integers(0, 12)), rng.integers(0, 4, rng.integers(0, 12))
    assert grm.edit_distance(a, b) == reference(a, b)


def test_reward_auc_matches_pairwise_count():
  rng = np.random.default_rng(2)
  rewards = [rng.choice([-0.1, -0.05, 0.0], n) for n in (5, 8, 3)]
  bad = [rng.random(n) < 0.4 for n in (5, 8, 3)]
  r, y = np.concatenate(rewards), np.concatenate(bad)
  pairs = [(g > b) + 0.5 * (g == b) for g, b in itertools.product(r[~y], r[y])]
  assert grm.reward_auc(rewards, bad) == pytest.approx(np.mean(pairs))
  assert grm.reward_auc([np.array([0.0, -0.1])], [np.array([False, True])]) == 1.0
  assert np.isnan(grm.reward_auc([np.zeros(2)], [np.zeros(2, bool)]))


def test_model_teacher_logic_on_scripted_outputs(monkeypatch):
  """Scripted model outputs -> the Edits the locate/rewrite protocol prescribes."""
  wrong = '[1] 4*5=20\n[2] 20-3=18\nThe answer is 18'
  script = {
    'locate': [
      'The first error step is [2]',
      'garbage',
      'The first error step is [9]',
      'The first error step is [2]',
    ],
    'rewrite': [
      '[2] 20-3=17\nThe answer is 17',
      GOLD,
      'The answer is 17',
      '[2] 20-3=18\nThe answer is 18',
    ],
  }
  seen = {}

  def fake(model, tokenizer, prompts, *, max_new_tokens, batch_size):
    texts = [tokenizer.decode(p) for p in prompts]
    phase = 'locate' if texts[0].startswith('Locate') else 'rewrite'
    seen[phase] = texts
    # cut at max_new_tokens as generation does: with byte tokens a whole locate answer is 28
    outs = [
      np.asarray(tokenizer.encode(o) + [tokenizer.eos_id])[:max_new_tokens] for o in script[phase]
    ]
    return outs[: len(prompts)], {'samples': len(prompts)}

  monkeypatch.setattr(grm, 'greedy_continue', fake)
  cases = [case(GOLD)] + [case(wrong + ' ' * i) for i in range(4)]
  got = grm.ModelTeacher(None, TOK, batch_size=4)(cases)
  assert got == [
    Edit(0, GOLD, 'correct'),
    Edit(2, GOLD, 'rewritten'),
    Edit(1, GOLD, 'locate_unparsed'),
    Edit(4, f'{wrong}\nThe answer is 17', 'locate_out_of_range'),
    Edit(2, wrong, 'unchanged'),
  ]
  prompts = minimum_edit.GrmPrompts()
  assert seen['locate'] == [prompts.locate_prompt(c) for c in cases[1:]]
  # the rewrite prompt continues after "Correct prediction:" + the copied steps 1..k-1
  assert seen['rewrite'][0] == prompts.rewrite_prompt(cases[1]) + '[1] 4*5=20\n'
  assert seen['rewrite'][1] == prompts.rewrite_prompt(cases[2])
  assert seen['rewrite'][2] == prompts.rewrite_prompt(cases[3]) + wrong + '\n'


def test_model_teacher_with_a_tiny_model(model):
  """Batched, padded teacher calls agree with unbatched greedy generation step by step."""
  cases = [case('[1] 4*5=20\n[2] 20-3=18\nThe answer is 18'), case(GOLD)]
  teacher = grm.ModelTeacher(model, TOK, locate_tokens=8, max_new_tokens=12, batch_size=2)
  got = teacher(cases)
  assert got[1] == Edit(0, GOLD, 'correct')

  def greedy(
    text, n
  ):  # one prompt, generated directly (same shapes: the compiled program is reused)
    ids = sequences.prompt_ids(TOK, text)
    rows = np.zeros((2, -(-len(ids) // 64) * 64), np.int32)
    rows[:, : len(ids)] = ids
    gen = sampling.generate(
      model,
      rows,
      np.array([len(ids)] * 2),
      greedy=True,
      max_new_tokens=n,
      stop_tokens=(TOK.eos_id,),
    )
    return TOK.decode(gen.to_lists()[0])

  prompts = minimum_edit.GrmPrompts()
  for c, edit in zip(cases[:1], got[:1]):
    k, note = minimum_edit.parse_locate(
      greedy(prompts.locate_prompt(c), 8), len(minimum_edit.steps(c.prediction))
    )
    prefix = minimum_edit.copy_prefix(c.prediction, k)
    text = greedy(prompts.rewrite_prompt(c) + (prefix + '\n' if prefix else ''), 12)
    assert edit.error_step == k and edit.rewrite == minimum_edit.join_rewrite(prefix, text)
    assert edit.note in (note, 'no_steps', 'unchanged')
  assert teacher.stats['locate/samples'] == 1 and teacher.stats['rewrite/samples'] == 1
  short = grm.ModelTeacher(model, TOK, max_prompt_len=50, batch_size=2)
  assert short(cases[:1]) == [Edit(-1, '', 'prompt_too_long')]
