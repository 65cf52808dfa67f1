"""SPPD's stages (arXiv 2502.13516): step trees of the policy's own samples with Monte Carlo step
values, a process reward model's (PRM) values, step pairs with their value margins, and the PRM as a
best-of-n reranker.

  step_tree   the policy's step trees of task problems (`kuaijax.inference.tree`: branching at each
              newline, shared prefixes prefilled once), one record per node: its prefix and step
              tokens, `mc_value` (Monte Carlo value of the state after the step) and, on kj_arith,
              `step_correct` (the program check: every step up to this one is right);
  tree_paths  the trees' complete solutions as `sample` records (for the `pairs` stage: sequence
              level DPO on the same samples);
  prm_values  a trained PRM's p(good step) of every node (`prm_value`), and the accuracies of the
              MC and PRM values against each other and the program check;
  step_pairs  (chosen, rejected) sibling steps after the same prefix whose values (`value`: mc_value
              or prm_value) differ by more than `min_gap`, with both values: SPPD's records;
  prm_rerank  best-of-n of the policy's samples of held-out problems by the PRM's solution score.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from flax import nnx

from kuaijax.data import minimum_edit, sequences
from kuaijax.inference import tree as tree_lib
from kuaijax.methods import prm
from kuaijax.sampling import best_of_n, sample_completions
from kuaijax.stages.base import cycle, register_stage_type

PROBLEM_FIELDS = ('prompt', 'question', 'answer', 'level')
DELIMITER = '\n'


def delimiter_ids(tokenizer) -> tuple[int, ...]:
  return tuple(tokenizer.encode(DELIMITER))


def step_correct(record: dict, path_text: str) -> bool | None:
  """kj_arith's exact check of a partial solution: every written step is right (the RLMEC program
  teacher's first wrong step lies beyond them); None for records of other tasks."""
  if 'question' not in record or 'answer' not in record:
    return None
  case = minimum_edit.Case(
    str(record['question']), str(record['completion']), str(record['answer']), path_text
  )
  return minimum_edit.ProgramTeacher.first_error(case) > len(minimum_edit.steps(path_text))


def _accuracy(pairs) -> float:
  pairs = [(a, b) for a, b in pairs if b is not None]
  return float(np.mean([a == b for a, b in pairs])) if pairs else float('nan')


def value_accuracies(records: Sequence[dict]) -> dict:
  """Agreement of the step values (> 0.5 = a good step) with the program check and each other."""
  good = lambda r, key: r[key] > 0.5
  out = {
    'steps': len(records),
    'mc_vs_truth': _accuracy((good(r, 'mc_value'), r.get('step_correct')) for r in records),
    'truth_good_fraction': _accuracy((True, r.get('step_correct')) for r in records),
  }
  if records and 'prm_value' in records[0]:
    out['prm_vs_truth'] = _accuracy((good(r, 'prm_value'), r.get('step_correct')) for r in records)
    out['prm_vs_mc'] = _accuracy((good(r, 'prm_value'), good(r, 'mc_value')) for r in records)
  return out


def _sampler_options(stage) -> tree_lib.SamplerOptions:
  b, dc, tok = stage.block, stage.config.data, stage.tokenizer
  return tree_lib.SamplerOptions(
    delimiters=delimiter_ids(tok),
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
    max_step_tokens=b.max_step_tokens,
    prompt_len=dc.prompt_len + b.max_depth * b.max_step_tokens,
    batch_size=b.batch_size,
    temperature=b.temperature,
    top_p=b.top_p if b.top_p < 1.0 else None,
  )


@register_stage_type('step_tree', refs=('policy', 'data'))
def step_tree_stage(stage) -> dict:
  """Options: policy, data, limit, offset (the problems), branching, max_depth, max_step_tokens,
  rollouts (per leaf cut at max_depth, each at most data.max_new_tokens), inner_rollouts (per
  inner node, default 0: graded values beyond the tree's own outcomes), temperature, top_p,
  batch_size (prefix rows per call). Writes one record per node (see the module docstring)."""
  b, dc, tok = stage.block, stage.config.data, stage.tokenizer
  problems = cycle(stage.records(b.data), b.offset, b.limit)
  options = _sampler_options(stage)
  model = nnx.merge(*stage.load_model(b.policy))

  def is_correct(problem: int, tokens: np.ndarray) -> bool:
    return bool(stage.task.is_correct(tok.decode(tokens), problems[problem]))

  start = time.perf_counter()
  with stage.axis_rules():
    tree = tree_lib.sample_tree(
      model,
      [sequences.prompt_ids(tok, r['prompt']) for r in problems],
      options=options,
      branching=b.branching,
      max_depth=b.max_depth,
      rng=stage.seed('tree'),
    )
    values, outcomes = tree_lib.monte_carlo_values(
      model,
      tree,
      options=options,
      is_correct=is_correct,
      rollouts=b.rollouts,
      max_new_tokens=dc.max_new_tokens,
      rng=stage.seed('rollouts'),
      inner_rollouts=b.get('inner_rollouts', 0),
    )
  seconds = time.perf_counter() - start
  records = []
  for i, node in enumerate(tree.nodes):
    problem = problems[node.problem]
    records.append(
      {
        **{k: problem[k] for k in PROBLEM_FIELDS if k in problem},
        'gold': problem.get('completion', ''),
        'index': node.problem,
        'node': i,
        'parent': node.parent,
        'depth': node.depth,
        'ends': node.ends,
        'prefix_tokens': node.path[: len(node.path) - len(node.step)],
        'step_tokens': node.step,
        'step': tok.decode(node.step),
        'mc_value': float(values[i]),
        'outcomes': int(outcomes[i]),
        'step_correct': step_correct(problem, tok.decode(node.path)),
      }
    )
  stage.write_data(records)
  first = [r['mc_value'] for r in records if r['parent'] < 0]
  return {
    'problems': len(problems),
    'nodes': len(records),
    'prefilled_prefixes': tree.prefilled,
    'complete_solutions': sum(r['ends'] == 'eos' for r in records),
    'cut_leaves': sum(r['ends'] == 'delimiter' and r['depth'] == b.max_depth for r in records),
    'mean_depth': float(np.mean([r['depth'] for r in records])) if records else float('nan'),
    'first_step_value': float(np.mean(first)) if first else float('nan'),
    'sampling_seconds': seconds,
    **value_accuracies(records),
  }


@register_stage_type('tree_paths', refs=('data',))
def tree_paths_stage(stage) -> dict:
  """Options: data (a step_tree stage). Writes its complete solutions (every terminal node's path)
  as `sample` records: the problem's fields, gold, index, completion(_tokens), correct."""
  out = []
  for r in stage.records(stage.block.data):
    if r['ends'] == 'delimiter':
      continue
    path = np.concatenate([r['prefix_tokens'], r['step_tokens']]).astype(np.int32)
    out.append(
      {
        **{k: r[k] for k in (*PROBLEM_FIELDS, 'gold', 'index') if k in r},
        'completion': stage.tokenizer.decode(path),
        'completion_tokens': path,
        'correct': r['mc_value'] == 1.0,  # a terminal node's value is its outcome
      }
    )
  stage.write_data(out)
  correct = sum(r['correct'] for r in out)
  return {'samples': len(out), 'sample_accuracy': correct / len(out) if out else float('nan')}


@register_stage_type('prm_values', refs=('data', 'prm'))
def prm_values_stage(stage) -> dict:
  """Options: data (a step_tree stage), prm (the PRM's stage or checkpoint), batch_size. Writes the
  nodes with `prm_value`, p(good step) after the node's prefix; summary: `value_accuracies`."""
  b, tok = stage.block, stage.tokenizer
  records = stage.records(b.data)
  graphdef, params = stage.load_model(b.prm)
  completions = [np.concatenate([r['prefix_tokens'], r['step_tokens']]) for r in records]
  start = time.perf_counter()
  with stage.axis_rules():
    probs = prm.score_steps(
      graphdef,
      params,
      tok,
      [sequences.prompt_ids(tok, r['prompt']) for r in records],
      completions,
      [np.array([len(c) - 1], np.int32) for c in completions],
      batch_size=b.batch_size,
    )
  seconds = time.perf_counter() - start
  out = [{**r, 'prm_value': float(p[0])} for r, p in zip(records, probs)]
  stage.write_data(out)
  return {**value_accuracies(out), 'scoring_seconds': seconds}


def distinct_siblings(nodes: Sequence[dict]) -> list[list[dict]]:
  """The nodes grouped by (problem, parent), each distinct step once (its first node)."""
  groups: dict[tuple, dict] = {}
  for r in nodes:
    group = groups.setdefault((r['index'], r['parent']), {})
    group.setdefault(tuple(np.asarray(r['step_tokens']).tolist()), r)
  return [list(group.values()) for group in groups.values()]


def sibling_order(nodes: Sequence[dict], *, reference: str, value: str, min_gap: float) -> float:
  """Of the (best, worst) distinct siblings whose `reference` values differ by more than `min_gap`,
  the fraction that `value` ranks the same way (a tie counts half): whether a PRM tells sibling
  steps apart, not just easy problems from hard ones."""
  agree = []
  for group in distinct_siblings(nodes):
    best = max(group, key=lambda r: r[reference])
    worst = min(group, key=lambda r: r[reference])
    if best[reference] - worst[reference] > min_gap:
      agree.append(0.5 if best[value] == worst[value] else float(best[value] > worst[value]))
  return float(np.mean(agree)) if agree else float('nan')


def step_pairs(
  nodes: Sequence[dict], *, value: str, min_gap: float, max_pairs_per_parent: int = 1
) -> tuple[list[dict], dict]:
  """SPPD's (chosen, rejected) pairs of sibling steps (same problem, same parent), and counts.

  Distinct sibling steps are ranked by `value`; the best and the worst, then the second best and
  the second worst, ... (at most `max_pairs_per_parent`) make a pair when their values differ by
  more than `min_gap`. Each pair keeps the shared prefix, both steps and both values
  (chosen_value / rejected_value); `true_order` is the fraction whose chosen step passes the program
  check and whose rejected one does not, `inverted` the converse.
  """
  if max_pairs_per_parent < 1:
    raise ValueError(f'max_pairs_per_parent must be >= 1, got {max_pairs_per_parent}')
  siblings = distinct_siblings(nodes)
  pairs = []
  for group in siblings:
    ranked = sorted(group, key=lambda r: -r[value])
    for k in range(min(max_pairs_per_parent, len(ranked) // 2)):
      chosen, rejected = ranked[k], ranked[-1 - k]
      if chosen[value] - rejected[value] <= min_gap:
        break
      pairs.append(
        {
          'index': chosen['index'],
          'prompt': chosen['prompt'],
          'depth': chosen['depth'],
          'prefix_tokens': chosen['prefix_tokens'],
          'chosen_tokens': chosen['step_tokens'],
          'rejected_tokens': rejected['step_tokens'],
          'chosen_value': float(chosen[value]),
          'rejected_value': float(rejected[value]),
          'chosen_correct': chosen.get('step_correct'),
          'rejected_correct': rejected.get('step_correct'),
        }
      )
  judged = [(p['chosen_correct'], p['rejected_correct']) for p in pairs]
  judged = [j for j in judged if None not in j]
  stats = {
    'parents': len(siblings),
    'pairs': len(pairs),
    'mean_gap': float(np.mean([p['chosen_value'] - p['rejected_value'] for p in pairs]))
    if pairs
    else float('nan'),
    'true_order': _accuracy(((c, r), (True, False)) for c, r in judged),
    'inverted': _accuracy(((c, r), (False, True)) for c, r in judged),
  }
  return pairs, stats


@register_stage_type('step_pairs', refs=('data',))
def step_pairs_stage(stage) -> dict:
  """Options: data (a step_tree or prm_values stage), value ('mc_value' | 'prm_value'), min_gap,
  max_pairs_per_parent. Writes `step_pairs` records (the `sppd` method's)."""
  b = stage.block
  pairs, stats = step_pairs(
    stage.records(b.data),
    value=b.value,
    min_gap=b.min_gap,
    max_pairs_per_parent=b.max_pairs_per_parent,
  )
  if not pairs:
    raise RuntimeError(f'stage {stage.name}: no sibling steps differ by more than {b.min_gap}')
  stage.write_data(pairs)
  return stats


@register_stage_type('prm_rerank', refs=('policy', 'prm', 'data'))
def prm_rerank_stage(stage) -> dict:
  """Best-of-n by the PRM. Options: policy, prm, data ('task:test'), limit, offset, num_samples,
  temperature, batch_size. Summary: the accuracy of one sample (mean over all), of the sample with
  the highest PRM solution score (`prm.solution_scores`: its worst step), and of an oracle that
  picks a correct sample whenever there is one (pass@n)."""
  b, dc, tok = stage.block, stage.config.data, stage.tokenizer
  problems = cycle(stage.records(b.data), b.offset, b.limit)
  with stage.axis_rules():
    samples = sample_completions(
      nnx.merge(*stage.load_model(b.policy)),
      tok,
      [r['prompt'] for r in problems],
      num_samples=b.num_samples,
      seed=stage.seed(),
      temperature=b.temperature,
      max_new_tokens=dc.max_new_tokens,
      prompt_len=dc.prompt_len,
      batch_size=b.batch_size,
    )
    graphdef, params = stage.load_model(b.prm)
    probs = prm.score_steps(
      graphdef,
      params,
      tok,
      [sequences.prompt_ids(tok, problems[s.index]['prompt']) for s in samples],
      [s.tokens for s in samples],
      [prm.step_ends(s.tokens, delimiter_ids(tok)) for s in samples],
      batch_size=b.batch_size,
    )
  right = lambda s: bool(stage.task.is_correct(s.text, problems[s.index]))
  best = best_of_n(samples, prm.solution_scores(probs))
  solved = {s.index for s in samples if right(s)}
  return {
    'problems': len(problems),
    'num_samples': b.num_samples,
    'sample_accuracy': float(np.mean([right(s) for s in samples])),
    'best_of_n_accuracy': float(np.mean([right(s) for s in best])),
    'oracle_accuracy': len(solved) / len(problems),
  }
