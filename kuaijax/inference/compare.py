"""Greedy chain of thought, Self-Consistency, USC and Self-Agreement side by side: accuracy vs k.

`compare_methods(model, tokenizer, items, ...)`: per sampling seed, k_max paths per question in
one batched call (`aggregate.sample_paths`; k uses the first k of them), then per k the SC vote
(trigger rule), one greedy USC call and one greedy SA call over those paths; plus one greedy path
per question. Returns per k and method the accuracy over the seeds (`multi_run.run_statistics`:
mean, std, uncertain problems) and the counted statuses of the aggregation calls (SC: paths
without a triggered answer; USC / SA: the parsers' statuses, where anything but 'ok' falls back to
the first path's answer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from kuaijax.inference import aggregate, answers, multi_run

METHODS = ('greedy', 'sc', 'usc', 'sa')


@dataclasses.dataclass(frozen=True)
class Item:
  """One evaluation question: its prompt, gold answer (normal form) and answer type."""

  question: str
  prompt: str
  gold: str
  answer_type: str


def check_ks(ks) -> tuple[int, ...]:
  """`ks` as a non-empty tuple of ints >= 1, else a ValueError naming ks."""
  bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1]
  if bad or not len(ks):
    raise ValueError(f'ks (paths per question) must be ints >= 1, got {tuple(ks)}')
  return tuple(int(k) for k in ks)


def prompt_width(tokenizer, texts: Sequence[str]) -> int:
  """The padded prompt width of `texts`: the longest (with bos) rounded up to a multiple of 64."""
  longest = max(len(tokenizer.encode_array(t)) for t in texts) + 1
  return -(-longest // 64) * 64


def greedy_texts(model, tokenizer, texts: Sequence[str], max_new_tokens: int) -> list[str]:
  """Greedy completions of `texts` in one padded width (`prompt_width`)."""
  return aggregate.greedy_completions(
    model,
    tokenizer,
    texts,
    prompt_len=prompt_width(tokenizer, texts),
    max_new_tokens=max_new_tokens,
  )


def _count(statuses: dict, name: str) -> None:
  statuses[name] = statuses.get(name, 0) + 1


def evaluate_seed(
  model,
  tokenizer,
  items: Sequence[Item],
  *,
  seed: int,
  ks: Sequence[int],
  temperature: float,
  top_k: int | None,
  max_new_tokens: int,
  prompting: dict,
  aggregate_tokens: int,
) -> dict[int, dict]:
  """Per k and method: `correct` [items] bool and a status count dict, for one sampling seed.

  `prompting`: sa_instruction, usc_instruction and lines (solution lines shown; 0 = all). The USC
  reply budget is half of `aggregate_tokens` (a response number), SA's all of it.
  """
  ks = check_ks(ks)
  prompts = [it.prompt for it in items]
  paths = aggregate.sample_paths(
    model,
    tokenizer,
    prompts,
    k=max(ks),
    seed=seed,
    temperature=temperature,
    top_k=top_k or None,
    prompt_len=prompt_width(tokenizer, prompts),
    max_new_tokens=max_new_tokens,
  )
  gold = np.array([it.gold for it in items])
  extracted = [
    [answers.extract_answer(p, it.answer_type, mode='clean') for p in group]
    for group, it in zip(paths, items)
  ]
  out = {}
  for k in ks:
    first_k = [e[:k] for e in extracted]
    sc = [
      aggregate.self_consistency(g[:k], it.answer_type, mode='trigger').answer
      for g, it in zip(paths, items)
    ]
    sc_status = {}
    for a in sc:
      _count(sc_status, 'no_answer' if a is None else 'ok')
    record = {'sc': {'correct': np.array(sc) == gold, 'status': sc_status}}
    if k == 1:  # one candidate: SA and USC must return it (or fall back to it)
      usc = sa = [e[0] for e in first_k]
      usc_status, sa_status = {'ok': len(items)}, {'ok': len(items)}
    else:
      usc_texts = [
        aggregate.usc_prompt(
          it.question,
          g[:k],
          instruction=prompting['usc_instruction'],
          max_response_lines=prompting['lines'],
        )
        for g, it in zip(paths, items)
      ]
      replies = greedy_texts(model, tokenizer, usc_texts, max(1, aggregate_tokens // 2))
      usc, usc_status = [], {}
      for reply, e in zip(replies, first_k):
        index, status = aggregate.parse_usc(reply, k)
        _count(usc_status, status)
        usc.append(e[index if index is not None else 0])
      sa_texts = [
        aggregate.self_agreement_prompt(
          it.question,
          g[:k],
          instruction=prompting['sa_instruction'],
          max_solution_lines=prompting['lines'],
        )
        for g, it in zip(paths, items)
      ]
      replies = greedy_texts(model, tokenizer, sa_texts, aggregate_tokens)
      sa, sa_status = [], {}
      for reply, e, it in zip(replies, first_k, items):
        parsed = aggregate.parse_self_agreement(reply, e, it.answer_type)
        _count(sa_status, parsed.status)
        sa.append(parsed.answer if parsed.status == 'ok' else e[0])  # fallback: the first path
    record['usc'] = {'correct': np.array(usc) == gold, 'status': usc_status}
    record['sa'] = {'correct': np.array(sa) == gold, 'status': sa_status}
    out[k] = record
  return out


def compare_methods(
  model,
  tokenizer,
  items: Sequence[Item],
  *,
  seeds: Sequence[int],
  ks: Sequence[int],
  temperature: float,
  top_k: int | None,
  max_new_tokens: int,
  prompting: dict,
  aggregate_tokens: int,
) -> dict:
  """Accuracy (fraction) per k and method over the sampling `seeds`; see the module docstring.

  Returns {'by_k': {k: {method: stats}}, 'num_items', 'greedy_texts_sample'}; stats are
  `multi_run.run_statistics` (accuracy, accuracy/std, uncertain_fraction, ...) plus `status`, the
  statuses counted over all seeds (greedy: one decode, std 0).
  """
  if not items:
    raise ValueError('compare_methods: no items')
  seeds = list(seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds must be a non-empty list of distinct seeds, got {seeds}')
  ks = check_ks(ks)
  texts = greedy_texts(model, tokenizer, [it.prompt for it in items], max_new_tokens)
  greedy = np.array(
    [
      answers.extract_answer(t, it.answer_type, mode='clean') == it.gold
      for t, it in zip(texts, items)
    ]
  )
  options = dict(
    ks=ks,
    temperature=temperature,
    top_k=top_k,
    max_new_tokens=max_new_tokens,
    prompting=prompting,
    aggregate_tokens=aggregate_tokens,
  )
  per_seed = [evaluate_seed(model, tokenizer, items, seed=s, **options) for s in seeds]
  table = {}
  for k in ks:
    row = {'greedy': multi_run.run_statistics([{'accuracy': float(greedy.mean())}], greedy[None])}
    for method in ('sc', 'usc', 'sa'):
      correct = np.stack([s[k][method]['correct'] for s in per_seed])
      stats = multi_run.run_statistics([{'accuracy': float(c.mean())} for c in correct], correct)
      status = {}
      for s in per_seed:
        for name, n in s[k][method]['status'].items():
          status[name] = status.get(name, 0) + int(n)
      row[method] = {**stats, 'status': status}
    table[k] = row
  return {'by_k': table, 'num_items': len(items), 'greedy_texts_sample': texts[:3]}
