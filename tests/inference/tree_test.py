"""Tree self-sampling: shared prefixes prefilled once, leaves equal to independent sampling of the
same paths, Monte Carlo values against exact enumeration."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kuaijax import sampling
from kuaijax.inference import tree as tree_lib
from kuaijax.models.transformer import Transformer, TransformerConfig

VOCAB = 29
EOS, PAD = 2, 0
CONFIG = TransformerConfig(
  vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=32, init_std=0.5
)
PROMPTS = [np.array([1, 5, 9, 11], np.int32), np.array([1, 7], np.int32)]


@pytest.fixture(scope='module')
def model():
  return Transformer(CONFIG, rngs=nnx.Rngs(0))


def options(delimiters, **overrides):
  fields = dict(
    delimiters=tuple(delimiters),
    eos_id=EOS,
    pad_id=PAD,
    max_step_tokens=4,
    prompt_len=32,
    batch_size=4,
  )
  return tree_lib.SamplerOptions(**{**fields, **overrides})


def frequent_tokens(model, count=3):
  """The tokens the random model emits most often: delimiters that give trees several levels."""
  samples = sampling.sample_token_prompts(
    model, PROMPTS, rng=0, stop_tokens=(), pad_id=PAD, prompt_len=32, num_samples=8,
    max_new_tokens=12, batch_size=2,
  )  # fmt: skip
  tokens, counts = np.unique(np.concatenate([s.tokens for s in samples]), return_counts=True)
  keep = ~np.isin(tokens, (EOS, PAD))
  tokens, counts = tokens[keep], counts[keep]
  return tuple(int(t) for t in tokens[np.argsort(-counts)][:count])


def test_greedy_tree_leaves_equal_independent_greedy_decoding(model):
  delimiters = frequent_tokens(model)
  opts = options(delimiters, temperature=0.0)
  tree = tree_lib.sample_tree(model, PROMPTS, options=opts, branching=2, max_depth=3, rng=0)
  independent = sampling.sample_token_prompts(
    model, PROMPTS, rng=0, stop_tokens=(EOS,), pad_id=PAD, prompt_len=32, greedy=True,
    max_new_tokens=12, batch_size=2,
  )  # fmt: skip
  assert max(n.depth for n in tree.nodes) > 1
  for node in tree.nodes:
    whole = independent[node.problem].tokens
    np.testing.assert_array_equal(node.path, whole[: len(node.path)])
    if node.ends == 'delimiter':
      assert node.step[-1] in delimiters and not np.isin(node.step[:-1], delimiters).any()


def test_sampled_tree_prefills_each_prefix_once_and_scores_like_independent_paths(
  model, monkeypatch
):
  delimiters = frequent_tokens(model)
  calls = []

  def spy(model, prefixes, **kw):
    calls.append(([tuple(p.tolist()) for p in prefixes], kw['num_samples']))
    return sampling.sample_token_prompts(model, prefixes, **kw)

  monkeypatch.setattr(tree_lib, 'sample_token_prompts', spy)
  tree = tree_lib.sample_tree(
    model, PROMPTS, options=options(delimiters), branching=3, max_depth=3, rng=7
  )
  children = tree.children()
  expanded = [i for i, n in enumerate(tree.nodes) if n.ends == 'delimiter' and n.depth < 3]
  # every prompt and every expanded node is one prefilled row, exactly once; b children each
  rows = [row for prefixes, _ in calls for row in prefixes]
  expected = [tuple(p.tolist()) for p in PROMPTS] + [tuple(tree.sequence(i)) for i in expanded]
  assert sorted(rows) == sorted(expected) and tree.prefilled == len(rows)
  assert {b for _, b in calls} == {3}
  assert all(len(children[i]) == 3 for i in expanded)
  assert sum(n.parent < 0 for n in tree.nodes) == 3 * len(PROMPTS)
  assert len(set(rows)) > len(PROMPTS)  # the trees branch
  # each step's log-probs (decoded from a copied cache) equal scoring its path from scratch
  prefixes = [
    tree.prompts[n.problem] if n.parent < 0 else tree.sequence(n.parent) for n in tree.nodes
  ]
  scored = sampling.score_completion_lists(
    model, prefixes, [n.step for n in tree.nodes], batch_size=8, pad_id=PAD
  )
  for node, logps in zip(tree.nodes, scored):
    np.testing.assert_allclose(node.logprobs, logps, atol=2e-4)


def test_monte_carlo_values_average_children_on_a_hand_made_tree():
  step = np.array([3], np.int32)
  node = lambda parent, depth, ends, path: tree_lib.Node(
    0, parent, depth, step, np.zeros(1, np.float32), np.array(path, np.int32), ends
  )
  # 0 -> (2: right, 3 -> (4: wrong, 5: right)); 1: wrong
  tree = tree_lib.Tree(
    [np.array([1], np.int32)],
    [
      node(-1, 1, 'delimiter', [3]),
      node(-1, 1, 'eos', [4]),
      node(0, 2, 'eos', [3, 5]),
      node(0, 2, 'delimiter', [3, 3]),
      node(3, 3, 'eos', [3, 3, 4]),
      node(3, 3, 'length', [3, 3, 5]),
    ],
  )
  right = lambda problem, tokens: tokens[-1] == 5
  values, counts = tree_lib.monte_carlo_values(
    None, tree, options=options((3,)), is_correct=right, rollouts=4, max_new_tokens=4, rng=0
  )
  np.testing.assert_allclose(values, [0.75, 0, 1, 0.5, 0, 1])
  np.testing.assert_array_equal(counts, [3, 1, 1, 2, 1, 1])


@dataclasses.dataclass(frozen=True)
class BigramConfig:
  vocab_size: int


class Bigram(nnx.Module):
  """A bigram LM following the Transformer API: next-token logits = table[last token]."""

  def __init__(self, table):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))
    self.config = BigramConfig(table.shape[0])

  def __call__(self, tokens, *, positions=None, segment_ids=None, caches=None, return_hidden=True):
    del positions, segment_ids
    return jax.nn.one_hot(tokens, self.config.vocab_size), {'caches': caches}

  def output_head(self):
    return self.table[...]

  def init_caches(self, batch, max_len):
    del max_len
    return jnp.zeros((batch, 1))


def test_monte_carlo_values_match_exact_enumeration_on_a_bigram_policy():
  # tokens: 0 pad, 1 bos, 2 eos, 3 delimiter, 4 'a', 5 'b'
  probs = np.full((6, 6), 1e-9)
  probs[:, 2:] = [[0.25, 0.15, 0.35, 0.25]] * 6
  probs[4, 2:] = [0.1, 0.3, 0.2, 0.4]
  model = Bigram(np.log(probs / probs.sum(-1, keepdims=True)))
  p = np.asarray(jax.nn.softmax(model.table[...]))
  right = lambda problem, tokens: tokens[-1] == EOS and np.sum(tokens == 4) >= 2
  rollout_len = 4

  def exact(path):
    """P(correct | completion so far) under the bigram chain (the prompt ends in 'a'): every
    continuation up to rollout_len tokens."""
    total = 0.0
    for n in range(1, rollout_len + 1):
      for tail in itertools.product(range(2, 6), repeat=n):
        if EOS in tail[:-1] or (n < rollout_len and tail[-1] != EOS):
          continue  # stops at the first eos; only full-length rows may lack one
        previous = [path[-1] if len(path) else 4, *tail[:-1]]
        prob = np.prod([p[a, b] for a, b in zip(previous, tail)])
        total += prob * right(0, np.concatenate([path, tail]))
    return total

  opts = options((3,), max_step_tokens=2, batch_size=8)
  tree = tree_lib.sample_tree(
    model, [np.array([1, 4], np.int32)], options=opts, branching=6, max_depth=1, rng=3
  )
  rollouts = 2000
  values, _ = tree_lib.monte_carlo_values(
    model, tree, options=opts, is_correct=right, rollouts=rollouts, max_new_tokens=rollout_len,
    rng=4,
  )  # fmt: skip
  cut = [i for i, n in enumerate(tree.nodes) if not n.terminal]
  assert cut
  for i, node in enumerate(tree.nodes):
    if node.terminal:
      assert values[i] == right(0, node.path)
    else:
      v = exact(node.path)
      assert abs(values[i] - v) < 4 * np.sqrt(v * (1 - v) / rollouts) + 1e-3, (node, v)
  # inner nodes with rollouts of their own: mostly those, plus their 2 children's values
  tree = tree_lib.sample_tree(
    model, [np.array([1, 4], np.int32)], options=opts, branching=2, max_depth=2, rng=5
  )
  values, counts = tree_lib.monte_carlo_values(
    model, tree, options=opts, is_correct=right, rollouts=1, max_new_tokens=rollout_len, rng=6,
    inner_rollouts=rollouts,
  )  # fmt: skip
  children = tree.children()
  inner = [i for i in range(len(tree.nodes)) if children[i]]
  assert inner
  for i in inner:
    v = exact(tree.nodes[i].path)
    assert counts[i] == rollouts + counts[children[i]].sum()
    assert abs(values[i] - v) < 4 * np.sqrt(v * (1 - v) / rollouts) + 2 / rollouts, (i, v)


def test_bad_options_raise():
  with pytest.raises(ValueError, match='delimiters'):
    options((EOS,))
  with pytest.raises(ValueError, match='branching'):
    tree_lib.sample_tree(None, PROMPTS, options=options((3,)), branching=0, max_depth=2, rng=0)
