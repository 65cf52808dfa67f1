"""Multiple-choice evaluator: adapters on local fixtures, scores against a brute-force full-logits
computation with a tiny random Transformer, accuracy against a hand count, and bad records."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.evals import multiple_choice as mc
from kuaijax.jit_cache import split_params
from kuaijax.train import lm_task
from tests.conftest import tiny_lm_config

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
TASKS = {
  'piqa': ('piqa.jsonl', 'piqa'),
  'hellaswag': ('hellaswag.jsonl', 'hellaswag'),
  'arc_easy': ('arc_easy.jsonl', 'arc'),
  'csqa': ('csqa.jsonl', 'csqa'),
  'bbh': ('bbh.jsonl', 'bbh'),
}


def _fixture(name):
  return os.path.join(FIXTURES, name)


@pytest.fixture(scope='module')
def tasks():
  return {name: mc.load_examples(_fixture(f), fmt) for name, (f, fmt) in TASKS.items()}


@pytest.fixture(scope='module')
def model():
  factory = lm_task.model_factory(tiny_lm_config().model)
  return nnx.jit(lambda: factory(nnx.Rngs(0)))()


def test_adapters_map_each_format(tasks):
  assert {k: len(v) for k, v in tasks.items()} == {
    'piqa': 3,
    'hellaswag': 3,
    'arc_easy': 3,
    'csqa': 2,
    'bbh': 3,
  }
  piqa = tasks['piqa'][1]
  assert piqa.context == 'Question: To cool a hot drink quickly,\nAnswer:'
  assert piqa.choices == (' put it in the microwave.', ' stir in a few ice cubes.')
  assert piqa.label == 1
  swag = tasks['hellaswag'][0]
  assert swag.context == 'Making a sandwich: A man puts two slices of bread on a plate. He'
  assert swag.choices[1] == ' jumps into the swimming pool. Dive.'  # [title] -> '. '
  assert [ex.label for ex in tasks['arc_easy']] == [1, 0, 2]  # letter, digit and list-form keys
  assert tasks['csqa'][0].choices == (' desk drawer', ' ocean', ' volcano')  # nested form
  assert len(tasks['csqa'][1].choices) == 5 and tasks['csqa'][1].label == 0  # flat HF form
  bbh = tasks['bbh']
  assert bbh[0].choices == (' (A)', ' (B)') and bbh[0].label == 0  # letters parsed from input
  assert bbh[1].choices == (' True', ' False') and bbh[1].label == 1  # options given
  assert bbh[2].choices == (' yes', ' no') and bbh[2].label == 0  # option texts parsed


def _brute_force_scores(model, examples, tokenizer):
  """Per choice: sum of log_softmax(full logits) over the choice tokens, one unpadded row each."""
  seqs, spans = [], []
  for ex in examples:
    context = [tokenizer.bos_id, *tokenizer.encode(ex.context)]
    for choice in ex.choices:
      cont = tokenizer.encode(choice)
      seqs.append(context + cont)
      spans.append((len(context), len(context) + len(cont)))
  length = max(len(s) for s in seqs)
  tokens = np.full((len(seqs), length), tokenizer.pad_id, np.int32)
  for r, s in enumerate(seqs):
    tokens[r, : len(s)] = s  # right padding: causal attention keeps it invisible
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
  logits = forward(state, jnp.asarray(tokens))
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
  flat = [
    sum(log_probs[r, t - 1, tokens[r, t]] for t in range(start, end))
    for r, (start, end) in enumerate(spans)
  ]
  out, k = [], 0
  for ex in examples:
    out.append(np.asarray(flat[k : k + len(ex.choices)]))
    k += len(ex.choices)
  return out


def test_scores_and_accuracy_match_brute_force(tasks, model):
  tokenizer = ByteTokenizer()
  evaluator = mc.MultipleChoiceEvaluator(tasks, tokenizer, max_len=160, batch_size=8)
  scores = evaluator.choice_scores(*split_params(model))
  every = [ex for name in TASKS for ex in tasks[name]]
  flat = _brute_force_scores(model, every, tokenizer)
  expected, k = {}, 0
  for name in TASKS:
    expected[name], k = flat[k : k + len(tasks[name])], k + len(tasks[name])
    assert len(scores[name]) == len(expected[name])
    for got, want in zip(scores[name], expected[name]):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3, err_msg=name)

  metrics = evaluator(model)
  for name in TASKS:
    examples, by_hand = tasks[name], expected[name]
    hits = sum(int(np.argmax(s)) == ex.label for s, ex in zip(by_hand, examples))
    per_char = [s / np.asarray([len(c) for c in ex.choices]) for s, ex in zip(by_hand, examples)]
    hits_norm = sum(int(np.argmax(s)) == ex.label for s, ex in zip(per_char, examples))
    assert metrics[f'acc/{name}'] == hits / len(examples)
    assert metrics[f'acc_norm/{name}'] == hits_norm / len(examples)
    assert metrics[f'count/{name}'] == len(examples)
    assert metrics[f'choices/{name}'] == sum(len(ex.choices) for ex in examples)
  assert metrics['acc'] == pytest.approx(np.mean([metrics[f'acc/{n}'] for n in TASKS]))


def test_accuracy_counts_length_normalisation():
  examples = [
    mc.MCExample('q', (' a', ' bbbbbbbbb'), 1),  # raw argmax 0, per-character argmax 1
    mc.MCExample('q', (' yes', ' no'), 0),
  ]
  scores = [np.array([-2.0, -9.0]), np.array([-1.0, -3.0])]
  assert mc.accuracy(examples, scores) == {'acc': 0.5, 'acc_norm': 1.0}


def test_truncation_keeps_the_choice():
  ex = mc.MCExample('x' * 50, (' yes',), 0)
  rows, example_of_row = mc.encode_rows([ex], ByteTokenizer(), max_len=10)
  assert rows['loss_mask'][0].tolist() == [0] * 6 + [1] * 4
  assert ByteTokenizer().decode(rows['targets'][0, 6:]) == ' yes'
  assert rows['inputs'][0, 6] == ByteTokenizer().encode('x')[0]
  assert example_of_row.tolist() == [0]


@pytest.mark.parametrize(
  'fmt, lines, match',
  [
    (
      'piqa',
      [
        '{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}',
        '{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}',
      ],
      r':2: label=2 is out of range',
    ),
    ('piqa', ['{"goal": "g", "sol1": "a", "label": 0}'], r":1: missing field 'sol2'"),
    (
      'hellaswag',
      ['{"ctx": "c", "endings": ["a", "b"], "label": "x"}'],
      r":1: label='x' is not an integer",
    ),
    (
      'arc',
      ['{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}'],
      r":1: answerKey='E' is not one of",
    ),
    ('csqa', ['{"question": "q", "answerKey": "A"}'], r":1: missing field 'choices'"),
    ('bbh', ['{"input": "no options here", "target": "x"}'], r':1: no "options" field'),
    ('bbh', ['{"input": "q", "target": "maybe", "options": ["yes", "no"]}'], r":1: target='maybe'"),
    ('piqa', ['not json'], r':1: invalid JSON'),
  ],
)
def test_bad_records_name_file_and_line(tmp_path, fmt, lines, match):
  path = tmp_path / 'bad.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(mc.RecordError, match=match) as info:
    mc.load_examples(str(path), fmt)
  assert str(path) in str(info.value)


def test_unknown_format_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match='format'):
    mc.load_examples(_fixture('piqa.jsonl'), 'mmlu')
  with pytest.raises(FileNotFoundError, match='missing.jsonl'):
    mc.load_examples(str(tmp_path / 'missing.jsonl'), 'piqa')


def test_tfds_records_are_decoded_and_named(monkeypatch):
  """tfds sources yield bytes and numpy arrays; errors name the data set, split and index."""
  records = [
    {
      'question': b'Which is hot?',
      'choices': {'text': np.array([b'ice', b'fire']), 'label': np.array([b'A', b'B'])},
      'answerKey': b'B',
    },
    {
      'question': b'q',
      'choices': {'text': np.array([b'a']), 'label': np.array([b'A'])},
      'answerKey': b'Z',
    },
  ]
  seen = {}

  def fake_source(name, *, split, data_dir=None):
    seen.update(name=name, split=split)
    return records

  monkeypatch.setattr(mc.sources, 'get_data_source', fake_source)
  (example,) = mc.load_examples('ai2_arc/ARC-Easy', 'arc', split='test', limit=1)
  assert example == mc.MCExample('Question: Which is hot?\nAnswer:', (' ice', ' fire'), 1)
  assert seen == {'name': 'ai2_arc/ARC-Easy', 'split': 'test'}
  with pytest.raises(mc.RecordError, match=r'ai2_arc/ARC-Easy\[test\] record 1: answerKey'):
    mc.load_examples('ai2_arc/ARC-Easy', 'arc', split='test')


def test_build_evaluator_from_config_entries():
  evaluator = mc.build_evaluator(
    [{'name': 'piqa', 'source': 'jsonl:' + _fixture('piqa.jsonl'), 'format': 'piqa', 'limit': 2}],
    ByteTokenizer(),
    max_len=64,
    batch_size=4,
  )
  assert len(evaluator.tasks['piqa']) == 2
  with pytest.raises(ValueError, match='unknown keys'):
    mc.build_evaluator(
      [{'name': 'x', 'source': 's', 'format': 'piqa', 'shots': 5}],
      ByteTokenizer(),
      max_len=8,
      batch_size=1,
    )
