"""Tree self-sampling at step boundaries, and Monte Carlo values of its steps (SPPD).

A problem's tree: from its prompt the policy samples `branching` first steps; a step ends at a step
delimiter (a newline on kj_arith) or at eos, and every step that ends at a delimiter is expanded the
same way, down to `max_depth` steps. Expansion runs level by level through
`kuaijax.sampling.sample_token_prompts`: each frontier node's prefix (prompt + the steps on its
path) is one prompt row, prefilled ONCE, and its KV cache is copied to its `branching` children,
which decode in parallel until their delimiter. `Tree.prefilled` counts the prefix rows.

Values (`monte_carlo_values`): a terminal node (its step ended with eos, or ran out of tokens) is
worth its outcome (the checker on its whole path); a leaf cut at `max_depth` is worth the mean
outcome of `rollouts` completions sampled from its path (prefilled once too); an inner node is worth
the mean of its children's values (and of `inner_rollouts` outcomes of its own, if asked for): each
child is a policy sample from the node's state, so the mean estimates V(state) = P(a correct final
answer | state) under the policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from kuaijax.sampling import sample_token_prompts

ENDS = ('delimiter', 'eos', 'length')  # how a step ended


@dataclasses.dataclass(frozen=True)
class Node:
  """One sampled step: of prompt `problem`, after node `parent` (-1: a first step), at `depth`
  (1-based); `step` its tokens (the delimiter / eos included), `logprobs` their raw log-probs under
  the sampling policy, `path` the completion tokens from the prompt through this step, `ends` one of
  `ENDS` ('delimiter' nodes are expanded unless at the depth limit)."""

  problem: int
  parent: int
  depth: int
  step: np.ndarray
  logprobs: np.ndarray
  path: np.ndarray
  ends: str

  @property
  def terminal(self) -> bool:
    return self.ends != 'delimiter'


@dataclasses.dataclass
class Tree:
  """The trees of a batch of prompts: `nodes` in level order (a parent before its children) and
  `prefilled`, the number of prefix rows the sampler prefilled (one per expanded node)."""

  prompts: list[np.ndarray]
  nodes: list[Node]
  prefilled: int = 0

  def children(self) -> list[list[int]]:
    """Node id -> its children's ids."""
    out: list[list[int]] = [[] for _ in self.nodes]
    for i, node in enumerate(self.nodes):
      if node.parent >= 0:
        out[node.parent].append(i)
    return out

  def sequence(self, i: int) -> np.ndarray:
    """Prompt + path of node i: the tokens a model continues from after that step."""
    node = self.nodes[i]
    return np.concatenate([self.prompts[node.problem], node.path]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """How steps and rollouts are sampled (shared by `sample_tree` and `monte_carlo_values`).

  delimiters: token ids that end a step (eos ends the solution); max_step_tokens: a step's budget;
  prompt_len: the widest prefix row (prompt + path); batch_size: prefix rows per generate call.
  """

  delimiters: tuple[int, ...]
  eos_id: int
  pad_id: int
  max_step_tokens: int
  prompt_len: int
  batch_size: int = 64
  temperature: float = 1.0
  top_p: float | None = None

  def __post_init__(self):
    if not self.delimiters or self.eos_id in self.delimiters:
      raise ValueError(f'delimiters must be non-empty and exclude eos, got {self.delimiters}')

  def sample(self, model, prefixes, *, rng, num_samples, stop_tokens, max_new_tokens):
    return sample_token_prompts(
      model,
      prefixes,
      rng=rng,
      stop_tokens=stop_tokens,
      pad_id=self.pad_id,
      prompt_len=self.prompt_len,
      num_samples=num_samples,
      temperature=self.temperature,
      top_p=self.top_p,
      max_new_tokens=max_new_tokens,
      batch_size=self.batch_size,
    )


def sample_tree(
  model,
  prompts: Sequence[np.ndarray],
  *,
  options: SamplerOptions,
  branching: int,
  max_depth: int,
  rng,
) -> Tree:
  """The step trees of `prompts` (token arrays, bos included); see the module docstring. Level d
  samples with `fold_in(rng, d)`."""
  if branching < 1 or max_depth < 1:
    raise ValueError(f'branching and max_depth must be >= 1, got {branching}, {max_depth}')
  rng = jax.random.key(rng) if isinstance(rng, int | np.integer) else rng
  tree = Tree([np.asarray(p, np.int32) for p in prompts], [])
  frontier = [(problem, -1) for problem in range(len(prompts))]  # (problem, node id)
  empty = np.zeros(0, np.int32)
  for depth in range(1, max_depth + 1):
    if not frontier:
      break
    prefixes = [tree.prompts[p] if n < 0 else tree.sequence(n) for p, n in frontier]
    tree.prefilled += len(prefixes)
    samples = options.sample(
      model,
      prefixes,
      rng=jax.random.fold_in(rng, depth),
      num_samples=branching,
      stop_tokens=(*options.delimiters, options.eos_id),
      max_new_tokens=options.max_step_tokens,
    )
    next_frontier = []
    for s in samples:
      problem, parent = frontier[s.index]
      if not s.stopped:
        ends = 'length'
      else:
        ends = 'eos' if s.tokens[-1] == options.eos_id else 'delimiter'
      path = tree.nodes[parent].path if parent >= 0 else empty
      tree.nodes.append(
        Node(problem, parent, depth, s.tokens, s.logprobs, np.concatenate([path, s.tokens]), ends)
      )
      if ends == 'delimiter' and depth < max_depth:
        next_frontier.append((problem, len(tree.nodes) - 1))
    frontier = next_frontier
  return tree


def monte_carlo_values(
  model,
  tree: Tree,
  *,
  options: SamplerOptions,
  is_correct: Callable[[int, np.ndarray], bool],
  rollouts: int,
  max_new_tokens: int,
  rng,
  inner_rollouts: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """(values [nodes] float32, outcome counts [nodes] int: the completed solutions behind each
  value).

  `is_correct(problem, completion_tokens)` checks a whole completion. Terminal nodes take their own
  outcome; leaves cut at the depth limit the mean over `rollouts` completions (to eos, at most
  `max_new_tokens`) sampled from their sequence with `rng`; inner nodes the mean of their children's
  values and of `inner_rollouts` outcomes of their own (each an unbiased sample of the node's value:
  more of them grade the values of small trees, whose means of a few outcomes are mostly 0 or 1).
  """
  if rollouts < 1 or inner_rollouts < 0:
    raise ValueError(
      f'rollouts must be >= 1 and inner_rollouts >= 0, got {rollouts}, {inner_rollouts}'
    )
  children = tree.children()
  sums = np.zeros(len(tree.nodes), np.float64)  # outcomes of the node itself or its own rollouts
  own = np.zeros(len(tree.nodes), np.int64)
  for i, node in enumerate(tree.nodes):
    if node.terminal:
      sums[i], own[i] = float(is_correct(node.problem, node.path)), 1
  cut = [i for i, n in enumerate(tree.nodes) if not n.terminal and not children[i]]
  inner = [i for i in range(len(tree.nodes)) if children[i]] if inner_rollouts else []
  for ids, count, key in ((cut, rollouts, rng), (inner, inner_rollouts, _rollout_key(rng))):
    if not ids:
      continue
    samples = options.sample(
      model,
      [tree.sequence(i) for i in ids],
      rng=key,
      num_samples=count,
      stop_tokens=(options.eos_id,),
      max_new_tokens=max_new_tokens,
    )
    for s in samples:
      i = ids[s.index]
      node = tree.nodes[i]
      sums[i] += is_correct(node.problem, np.concatenate([node.path, s.tokens]))
      own[i] += 1
  values = np.zeros(len(tree.nodes), np.float32)
  counts = own.copy()
  for i in reversed(range(len(tree.nodes))):  # children come after their parent
    kids = children[i]
    values[i] = (values[kids].sum() + sums[i]) / (len(kids) + own[i])
    counts[i] += counts[kids].sum()
  return values, counts


def _rollout_key(rng):
  """The inner nodes' rollout key: the cut leaves' key folded with 1."""
  return jax.random.fold_in(jax.random.key(rng) if isinstance(rng, int | np.integer) else rng, 1)
