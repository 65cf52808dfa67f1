"""The 'self_agreement' evaluator against hand-computed accuracies and statuses on a stub sampler,
its options, and the toy items it builds."""

import ml_collections
import numpy as np
import pytest
from flax import nnx

from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.evals import registry
from kuaijax.evals import self_agreement as sa_eval
from kuaijax.inference import aggregate, compare, sa_toy
from kuaijax.models.transformer import Transformer, TransformerConfig

ITEMS = [
  compare.Item('q1', 'Question: q1\nSolution:\n', '5', 'number'),
  compare.Item('q2', 'Question: q2\nSolution:\n', 'apple', 'text'),
]
# Paths per sampling seed and item (k_max = 3).
PATHS = {
  0: [
    ['The answer is 5', 'The answer is 4', 'The answer is 4'],
    ['x\napple', 'x\nbread', 'x\napple'],
  ],
  1: [['The answer is 5', 'The answer is 5', 'oops'], ['x\nbread', 'x\nbread', 'x\napple']],
}
GREEDY = {ITEMS[0].prompt: 'The answer is 5', ITEMS[1].prompt: 'Sorted\nbread'}


def _sample_paths(model, tokenizer, prompts, *, k, seed, **options):
  del model, tokenizer, options
  assert prompts == [it.prompt for it in ITEMS]
  return [p[:k] for p in PATHS[seed]]


def _greedy(model, tokenizer, texts, **options):
  """SA: ' 4' for q1, ' apple' for q2; USC: response 2; the items' own prompts: GREEDY."""
  del model, tokenizer, options
  out = []
  for t in texts:
    if t.endswith(aggregate.SA_CUE):
      out.append(' 4' if 'Question: q1' in t else ' apple')
    elif t.endswith(aggregate.USC_CUE):
      out.append(' 2')
    else:
      out.append(GREEDY[t])
  return out


@pytest.fixture
def stub(monkeypatch):
  monkeypatch.setattr(aggregate, 'sample_paths', _sample_paths)
  monkeypatch.setattr(aggregate, 'greedy_completions', _greedy)


def _model():
  cfg = TransformerConfig(
    vocab_size=259, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1, d_ff=8
  )
  return Transformer(cfg, rngs=nnx.Rngs(0))


def test_metrics_match_hand_computed_values(stub):
  evaluator = sa_eval.SelfAgreementEvaluator(
    {'trigger': ITEMS},
    ByteTokenizer(),
    seeds=(0, 1),
    ks=(1, 3),
    temperature=0.7,
    top_k=None,
    max_new_tokens=8,
    prompting=sa_toy.aggregation_prompting('toy'),
    aggregate_tokens=8,
  )
  m = evaluator(_model())
  cell = lambda k, method, stat: m[sa_eval.metric_name('sa', 'trigger', k, method, stat)]
  assert m['sa/trigger/num_items'] == 2 and m['sa/trigger/greedy/accuracy'] == 0.5
  # k=1: SC votes with the trigger rule only (q2's paths have none); USC / SA return path 1.
  assert cell(1, 'sc', 'accuracy') == 0.5 and cell(1, 'sc', 'accuracy/std') == 0.0
  assert sa_eval.statuses(m, 'sa', 'trigger', 1, 'sc') == {'ok': 2, 'no_answer': 2}
  assert sa_eval.statuses(m, 'sa', 'trigger', 3, 'sc') == {'ok': 2, 'no_answer': 2}
  for method in ('usc', 'sa'):  # seed 0 solves both, seed 1 only q1
    assert cell(1, method, 'accuracy') == 0.75
    assert cell(1, method, 'accuracy/std') == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert cell(1, method, 'uncertain_fraction') == 0.5
    assert cell(1, method, 'accuracy_on_certain') == 1.0
  # k=3: SC 4 (wrong) then 5 (right) on q1; USC always response 2: 4, bread, 5, bread.
  assert (cell(3, 'sc', 'accuracy'), cell(3, 'usc', 'accuracy')) == (0.25, 0.25)
  assert (cell(3, 'sc', 'accuracy/min'), cell(3, 'sc', 'accuracy/max')) == (0.0, 0.5)
  assert sa_eval.statuses(m, 'sa', 'trigger', 3, 'usc') == {'ok': 4}
  # SA: q1 replies 4: a candidate in seed 0 (wrong), not one in seed 1 (fallback to path 1: 5);
  # q2 replies apple, a candidate in both seeds (right): 0.5 and 1.0.
  assert cell(3, 'sa', 'accuracy') == 0.75 and cell(3, 'sa', 'num_runs') == 2
  assert sa_eval.statuses(m, 'sa', 'trigger', 3, 'sa') == {'ok': 3, 'not_candidate': 1}
  assert m['sa/trigger/greedy_texts_sample'] == ['The answer is 5', 'Sorted\nbread']


def _options(**overrides):
  return {
    'type': 'self_agreement',
    'scenarios': ('trigger', 'mixed'),
    'levels': (1,),
    'problems_per_level': 2,
    'word_questions': 3,
    'train_word_examples': 20,
    'ks': (1, 2),
    'seeds': (0,),
    'temperature': 0.7,
    'top_k': 0,
    'max_new_tokens': 8,
    'prompts': 'toy',
    'aggregate_tokens': 8,
    **overrides,
  }


def _build(**overrides):
  ctx = registry.EvalContext(
    tokenizer=ByteTokenizer(), data=ml_collections.ConfigDict(dict(data_dir=''))
  )
  return registry.build_evaluators(ml_collections.ConfigDict({'sa': _options(**overrides)}), ctx)


def test_built_by_name_with_the_toy_items():
  evaluator = _build().evaluators['sa']
  trigger, mixed = evaluator.items['trigger'], evaluator.items['mixed']
  assert len(trigger) == 2 and len(mixed) == 2 + 3
  assert all(it.prompt.endswith('Solution:\n') for it in trigger)
  assert all(it.prompt.endswith(sa_toy.NO_TRIGGER_CUE + '\n') for it in mixed)
  train_words = {q for q, _, _ in sa_toy.word_problems(sa_toy.TRAIN_WORD_SEED, 20)}
  words = [it for it in mixed if it.answer_type == 'text']
  assert len(words) == 3 and not {it.question for it in words} & train_words
  assert evaluator.options['top_k'] is None  # 0 = off


@pytest.mark.parametrize(
  'overrides, match',
  [
    (dict(ks=(0, 3)), 'ks'),
    (dict(prompts='fancy'), 'prompts'),
    (dict(scenarios=('trigger', 'other')), 'scenarios'),
  ],
)
def test_bad_options(overrides, match):
  with pytest.raises(ValueError, match=match):
    _build(**overrides)


def test_missing_option_is_named():
  options = _options()
  del options['ks']
  ctx = registry.EvalContext(
    tokenizer=ByteTokenizer(), data=ml_collections.ConfigDict(dict(data_dir=''))
  )
  with pytest.raises(ValueError, match='misses option'):
    registry.build_evaluators(ml_collections.ConfigDict({'sa': options}), ctx)
