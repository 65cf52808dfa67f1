"""Self-Consistency, Universal Self-Consistency and Self-Agreement over k sampled reasoning paths.

- Ask k times: `sample_paths` draws k paths per prompt in ONE batched `sampling.generate` call
  (`num_samples=k`; the prompt is prefilled once and its KV cache copied per path).
- Self-Consistency (SC): `majority_vote` over rule-extracted answers (`answers.extract_answer`);
  ties go to the answer seen first; paths without an answer do not vote.
- Universal Self-Consistency (USC): `usc_prompt` lists the whole responses and asks which one is
  the most consistent; `parse_usc` reads the chosen response number.
- Self-Agreement (SA): `self_agreement_prompt` = instruction block, the question, "Solution 1: ...
  Solution k: ..." and the cue "The majority voted answer is"; one greedy call completes it and
  `parse_self_agreement` accepts the answer only when it is one of the paths' extracted answers.
Parsers never raise on model output: they return a status ('ok', 'unparsable', 'not_candidate',
'out_of_range') so callers count fallbacks.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from kuaijax.inference import answers
from kuaijax.sampling import sample_completions

SA_INSTRUCTION = (
  'Below are several solutions to the same question. Understand the question first. Then extract '
  'the final answer of every solution into a list, count how many solutions give each answer, and '
  'reply with the answer that has the most votes (if several answers tie, reply with any one of '
  'them).'
)
SA_CUE = 'The majority voted answer is'
USC_INSTRUCTION = (
  'Evaluate these responses. Select the most consistent response based on majority consensus.'
)
USC_CUE = 'The most consistent response is Response'


def check_k(k) -> int:
  """k as an int >= 1, else a ValueError naming k."""
  if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
    raise ValueError(f'k (paths per question) must be an int >= 1, got {k!r}')
  return int(k)


@dataclasses.dataclass(frozen=True)
class Vote:
  """A majority vote: the winner (None when no path had an answer), its votes, all counts."""

  answer: str | None
  count: int
  counts: dict[str, int]
  num_valid: int  # paths that had an answer


def majority_vote(path_answers: Sequence[str | None]) -> Vote:
  """The most frequent non-None answer; a tie goes to the answer that occurs first."""
  valid = [a for a in path_answers if a is not None]
  counts = collections.Counter(valid)  # insertion-ordered: first occurrence first
  if not counts:
    return Vote(None, 0, {}, 0)
  best = max(counts.values())
  winner = next(a for a in counts if counts[a] == best)
  return Vote(winner, best, dict(counts), len(valid))


def self_consistency(
  paths: Sequence[str], answer_type: str = 'number', *, mode: str = 'clean'
) -> Vote:
  """SC: extract each path's answer with the rules of `answer_type`, then `majority_vote`."""
  return majority_vote([answers.extract_answer(p, answer_type, mode=mode) for p in paths])


def format_solution(text: str, max_lines: int = 0) -> str:
  """A path as one block: its non-empty lines (the last `max_lines` of them when > 0)."""
  if max_lines < 0:
    raise ValueError(f'max_lines must be >= 0 (0 = all lines), got {max_lines}')
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return '\n'.join(lines[-max_lines:] if max_lines else lines)


def self_agreement_prompt(
  question: str,
  solutions: Sequence[str],
  *,
  instruction: str = SA_INSTRUCTION,
  max_solution_lines: int = 0,
) -> str:
  """The "ask one more time" prompt; the model's continuation after the cue is the answer."""
  check_k(len(solutions))
  parts = [instruction, f'Question: {question}'] if instruction else [f'Question: {question}']
  parts += [
    f'Solution {i}: {format_solution(s, max_solution_lines)}' for i, s in enumerate(solutions, 1)
  ]
  return '\n'.join(parts + [SA_CUE])


@dataclasses.dataclass(frozen=True)
class Parsed:
  """A parsed aggregation call: the answer (None unless status == 'ok') and why not."""

  answer: str | None
  status: str  # 'ok' | 'unparsable' | 'not_candidate' | 'out_of_range'


def parse_self_agreement(
  completion: str, candidates: Sequence[str | None], answer_type: str = 'number'
) -> Parsed:
  """The answer after the cue (its first line, cleaned by type); valid only if a path gave it."""
  answers.check_answer_type(answer_type)
  line = completion.strip().split('\n', 1)[0]
  answer = answers.clean_answer(line, answer_type, first=True) if line else None
  if answer is None:
    return Parsed(None, 'unparsable')
  if answer not in {c for c in candidates if c is not None}:
    return Parsed(None, 'not_candidate')
  return Parsed(answer, 'ok')


def usc_prompt(
  question: str,
  responses: Sequence[str],
  *,
  instruction: str = USC_INSTRUCTION,
  max_response_lines: int = 0,
) -> str:
  """The USC prompt: the question, "Response 1: ... Response k: ...", the instruction, the cue."""
  check_k(len(responses))
  parts = [f'I have generated the following responses to the question: {question}']
  parts += [
    f'Response {i}: {format_solution(r, max_response_lines)}' for i, r in enumerate(responses, 1)
  ]
  return '\n'.join(parts + [instruction, USC_CUE] if instruction else parts + [USC_CUE])


def parse_usc(completion: str, k: int) -> tuple[int | None, str]:
  """(0-based index of the chosen response, status) from the first number after the cue."""
  k = check_k(k)
  number = answers.clean_answer(completion.strip().split('\n', 1)[0], 'number', first=True)
  if number is None or not number.lstrip('-').isdigit():
    return None, 'unparsable'
  index = int(number)
  if not 1 <= index <= k:
    return None, 'out_of_range'
  return index - 1, 'ok'


def sample_paths(
  model,
  tokenizer,
  prompt_texts: Sequence[str],
  *,
  k: int,
  seed: int = 0,
  greedy: bool = False,
  temperature: float = 0.7,
  top_k: int | None = None,
  top_p: float | None = None,
  max_new_tokens: int = 128,
  prompt_len: int = 256,
  batch_size: int = 0,
) -> list[list[str]]:
  """k completions of every prompt: paths[i][j] is path j of prompt i.

  Each batch of `batch_size` prompts (0: all at once) is ONE `generate` call with num_samples=k;
  batches keep one shape (the last is padded with copies) so a single compiled program serves all.
  Batch b samples with `fold_in(key(seed), b)`.
  """
  k = check_k(k)
  if not prompt_texts:
    return []
  samples = sample_completions(
    model,
    tokenizer,
    prompt_texts,
    num_samples=k,
    seed=seed,
    greedy=greedy,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    max_new_tokens=max_new_tokens,
    prompt_len=prompt_len,
    batch_size=batch_size or len(prompt_texts),
  )
  texts = [s.text for s in samples]
  return [texts[i * k : (i + 1) * k] for i in range(len(prompt_texts))]


def greedy_completions(model, tokenizer, prompt_texts: Sequence[str], **options) -> list[str]:
  """One greedy completion per prompt (the "ask one more time" call of SA and USC)."""
  options.update(k=1, greedy=True)
  return [p[0] for p in sample_paths(model, tokenizer, prompt_texts, **options)]
