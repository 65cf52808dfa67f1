"""SC vote and tie rule, SA prompt construction and parse, USC selection, k paths in one call."""

import jax
import numpy as np
import pytest
from flax import nnx

from kuaijax import sampling
from kuaijax.data import sequences
from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.inference import aggregate
from kuaijax.models.transformer import Transformer, TransformerConfig


def test_majority_vote_and_tie_rule():
  vote = aggregate.majority_vote(['3', None, '5', '5', '3', '7'])
  assert vote.answer == '3' and vote.count == 2  # 3 and 5 tie; 3 occurs first
  assert vote.counts == {'3': 2, '5': 2, '7': 1} and vote.num_valid == 5
  assert aggregate.majority_vote(['9', '5', '5']).answer == '5'
  empty = aggregate.majority_vote([None, None])
  assert empty.answer is None and empty.num_valid == 0


def test_self_consistency_extracts_then_votes():
  paths = ['The answer is 4', 'x = 5\nThe answer is 5', 'I got 5 in the end', 'The answer is 4']
  assert aggregate.self_consistency(paths).answer == '4'  # 4 (first) ties with 5 (2 each)
  assert aggregate.self_consistency(paths, mode='trigger').counts == {'4': 2, '5': 1}
  assert aggregate.self_consistency(['(B)', '(C)', 'The answer is C'], 'choice').answer == 'C'


def test_self_agreement_prompt_layout():
  prompt = aggregate.self_agreement_prompt(
    'How many?', ['[1] 2+2=4\nThe answer is 4', 'The answer is 5'], instruction='Vote.'
  )
  assert prompt == (
    'Vote.\nQuestion: How many?\nSolution 1: [1] 2+2=4\nThe answer is 4\n'
    'Solution 2: The answer is 5\nThe majority voted answer is'
  )
  short = aggregate.self_agreement_prompt('Q', ['a\nb\nc'], max_solution_lines=1)
  assert short.startswith(aggregate.SA_INSTRUCTION) and 'Solution 1: c\n' in short
  with pytest.raises(ValueError, match='k'):
    aggregate.self_agreement_prompt('Q', [])


def test_parse_self_agreement():
  candidates = ['4', None, '5']
  assert aggregate.parse_self_agreement(' 5.\nSolution', candidates) == aggregate.Parsed('5', 'ok')
  assert aggregate.parse_self_agreement(' 6', candidates).status == 'not_candidate'
  assert aggregate.parse_self_agreement(' many', candidates).status == 'unparsable'
  assert aggregate.parse_self_agreement('', candidates).status == 'unparsable'
  assert aggregate.parse_self_agreement(' (B)', ['B'], 'choice').answer == 'B'
  assert aggregate.parse_self_agreement(' Blue.', ['blue'], 'text').answer == 'blue'


def test_usc_prompt_and_selection():
  prompt = aggregate.usc_prompt('Q?', ['r one', 'r two'])
  assert 'Response 1: r one\nResponse 2: r two\n' in prompt
  assert prompt.endswith(aggregate.USC_CUE)
  assert aggregate.parse_usc(' 2.', 2) == (1, 'ok')
  assert aggregate.parse_usc(' 3', 2) == (None, 'out_of_range')
  assert aggregate.parse_usc(' 0', 2) == (None, 'out_of_range')
  assert aggregate.parse_usc(' two', 2) == (None, 'unparsable')


@pytest.mark.parametrize('k', [0, -1, 1.5, True])
def test_bad_k(k):
  with pytest.raises(ValueError, match='k'):
    aggregate.check_k(k)


@pytest.fixture(scope='module')
def model():
  config = TransformerConfig(
    vocab_size=259, d_model=16, num_layers=1, num_heads=2, d_ff=32, init_std=0.3
  )
  return Transformer(config, rngs=nnx.Rngs(0))


def test_sample_paths_is_one_batched_generate_call(model):
  tok = ByteTokenizer()
  texts = ['Question: a', 'Question: bb']
  paths = aggregate.sample_paths(model, tok, texts, k=3, seed=4, max_new_tokens=5, prompt_len=16)
  prompts, lengths = sequences.prompt_batch(tok, texts, 16)
  gen = sampling.generate(
    model,
    prompts,
    lengths,
    rng=jax.random.fold_in(jax.random.key(4), 0),
    max_new_tokens=5,
    temperature=0.7,
    stop_tokens=(tok.eos_id,),
    num_samples=3,
  )
  expected = [
    tok.decode(row[:n]) for row, n in zip(np.asarray(gen.tokens), np.asarray(gen.lengths))
  ]
  assert [p for group in paths for p in group] == expected
  greedy = aggregate.sample_paths(
    model, tok, texts, k=2, greedy=True, max_new_tokens=5, prompt_len=16
  )
  single = aggregate.greedy_completions(model, tok, texts, max_new_tokens=5, prompt_len=16)
  assert [g[0] for g in greedy] == [g[1] for g in greedy] == single
  with pytest.raises(ValueError, match='prompt_len'):
    sequences.prompt_batch(tok, ['x' * 20], 16)
