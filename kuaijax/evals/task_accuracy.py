"""Task accuracy from the model's own generations: sampled over several seeds (mean ± std) and greedy.

`sample_completions` decodes prompts with `kuaijax.sampling.generate` (n samples per prompt in one
call per batch, fixed shapes so one program serves every call); `accuracy_by_group` scores texts with
the task's checker, broken down by the task's group field (kj_arith: level);
`TaskAccuracyEvaluator` is the evaluator registered as 'task_accuracy'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from kuaijax import parallel, sampling
from kuaijax.data import sequences, tasks
from kuaijax.evals.base import Evaluator


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled completion of prompt `index`: tokens (stop token included when it stopped), raw
  per-token log-probs under the sampling model (temperature 1) and the decoded text."""

  index: int
  tokens: np.ndarray
  logprobs: np.ndarray
  text: str


def sample_completions(
  model,
  tokenizer,
  prompts: Sequence[str],
  *,
  num_samples: int = 1,
  seed: int = 0,
  greedy: bool = False,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  max_new_tokens: int = 128,
  prompt_len: int = 320,
  batch_size: int = 64,
) -> list[Sample]:
  """`num_samples` completions per prompt (rows of prompt i are consecutive).

  Batches of `batch_size` prompts have a fixed shape (the last is padded with copies) so one
  compiled program serves every call; batch b samples with `fold_in(key(seed), b)`.
  """
  if num_samples < 1:
    raise ValueError(f'num_samples must be >= 1, got {num_samples}')
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start : start + batch_size])
    rows, lengths = sequences.prompt_batch(
      tokenizer, chunk + [chunk[0]] * (batch_size - len(chunk)), prompt_len
    )
    gen = sampling.generate(
      model,
      rows,
      lengths,
      rng=jax.random.fold_in(jax.random.key(seed), start // batch_size),
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      greedy=greedy,
      stop_tokens=(tokenizer.eos_id,),
      num_samples=num_samples,
      pad_id=tokenizer.pad_id,
    )
    tokens, logprobs, gen_lengths = parallel.host_value((gen.tokens, gen.logprobs, gen.lengths))
    texts = sequences.decode_completions(tokenizer, tokens, gen_lengths)
    for row in range(len(chunk) * num_samples):
      n = int(gen_lengths[row])
      out.append(
        Sample(
          start + row // num_samples,
          np.asarray(tokens[row, :n], np.int32),
          np.asarray(logprobs[row, :n], np.float32),
          texts[row],
        )
      )
  return out


def accuracy_by_group(correct: Sequence[bool], groups: Sequence, name: str = '') -> dict:
  """{'accuracy', 'count'} plus 'accuracy/{name}_{g}', 'count/{name}_{g}' per group value g.

  An empty list gives count 0 and accuracy NaN; name '' gives no per-group entries.
  """
  correct = np.asarray(correct, bool)
  if len(correct) != len(groups):
    raise ValueError(f'{len(correct)} results for {len(groups)} records')
  out = {'accuracy': float(correct.mean()) if len(correct) else float('nan'), 'count': len(correct)}
  if name:
    groups = np.asarray(groups)
    for g in sorted(set(groups.tolist())):
      sel = groups == g
      out[f'accuracy/{name}_{g}'] = float(correct[sel].mean())
      out[f'count/{name}_{g}'] = int(sel.sum())
  return out


def summarise_seeds(per_seed: Sequence[dict]) -> dict:
  """Mean, sample std (ddof 1; 0 for one seed), min and max of every accuracy key over seeds."""
  out = {}
  for key in per_seed[0]:
    if not key.startswith('accuracy'):
      out[key] = per_seed[0][key]
      continue
    values = np.array([r[key] for r in per_seed], np.float64)
    out[key] = float(values.mean())
    out[f'{key}/std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out[f'{key}/min'], out[f'{key}/max'] = float(values.min()), float(values.max())
  out['num_seeds'] = len(per_seed)
  return out


def load_eval_records(task: tasks.Task, split: str, *, per_group: int, groups=(), data_dir=''):
  """`per_group` records for each value in `groups` (kj_arith levels), or `per_group` in all."""
  if not groups:
    return task.load(split, data_dir=data_dir, limit=per_group)
  records = []
  for g in groups:
    records += task.load(split, data_dir=data_dir, limit=per_group, levels=(g,))
  return records


class TaskAccuracyEvaluator(Evaluator):
  """Accuracy of sampled completions (mean ± std over `seeds`) and, optionally, greedy ones.

  Metrics: accuracy, accuracy/std (and per group: accuracy/level_1, accuracy/level_1/std, ...),
  num_seeds, count; with greedy, the same under greedy/ (one decode).
  """

  def __init__(
    self,
    task: tasks.Task,
    records: Sequence[dict],
    tokenizer,
    *,
    seeds: Sequence[int] = (0,),
    temperature: float = 1.0,
    greedy: bool = True,
    **generate_options,
  ):
    if not records:
      raise ValueError('task_accuracy: no evaluation records')
    if not seeds:
      raise ValueError('task_accuracy needs at least one seed')
    self.task, self.records, self.tokenizer = task, list(records), tokenizer
    self.seeds, self.temperature, self.greedy = tuple(seeds), temperature, greedy
    self.options = generate_options
    self.prompts = [r['prompt'] for r in self.records]
    self.groups = [r.get(task.group, 0) for r in self.records] if task.group else [0] * len(records)

  def score(self, samples: Sequence[Sample]) -> dict:
    correct = [self.task.is_correct(s.text, self.records[s.index]) for s in samples]
    return accuracy_by_group(correct, self.groups, self.task.group)

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    model = nnx.merge(graphdef, params)
    run = lambda **kw: self.score(
      sample_completions(model, self.tokenizer, self.prompts, **self.options, **kw)
    )
    out = summarise_seeds([run(seed=s, temperature=self.temperature) for s in self.seeds])
    if self.greedy:
      out.update({f'greedy/{k}': v for k, v in run(greedy=True).items()})
    return out
