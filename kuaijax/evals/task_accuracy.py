"""Task accuracy from the model's own generations: sampled over several seeds (mean ± std) and greedy.

Completions come from `kuaijax.sampling.sample_completions`; `accuracy_by_group` scores texts with
the task's checker, broken down by the task's group field (kj_arith: level);
`TaskAccuracyEvaluator` is the evaluator registered as 'task_accuracy'.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import nnx

from kuaijax.data import tasks
from kuaijax.evals.base import Evaluator
from kuaijax.evals.registry import register_evaluator
from kuaijax.sampling import Sample, sample_completions


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
  """Mean, sample std (ddof 1; 0 for one seed), min and max over seeds of every measured key (all
  but the counts, which every seed shares)."""
  out = {}
  for key in per_seed[0]:
    if key.startswith('count'):
      out[key] = per_seed[0][key]
      continue
    values = np.array([r[key] for r in per_seed], np.float64)
    out[key] = float(values.mean())
    out[f'{key}/std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out[f'{key}/min'], out[f'{key}/max'] = float(values.min()), float(values.max())
  out['num_seeds'] = len(per_seed)
  return out


def multi_run(per_seed_correct: Sequence[Sequence[bool]]) -> dict:
  """Per problem over n sampling runs (one completion each): 'runs/solved_any' (pass@n),
  'runs/solved_all', and 'runs/uncertain' = solved in some runs but not all (the GRPO analysis's
  multi-run evaluation: problems the policy has not settled). Rows are runs, columns problems."""
  hits = np.asarray(per_seed_correct, bool).sum(axis=0)
  n = len(per_seed_correct)
  return {
    'runs/solved_any': float((hits > 0).mean()),
    'runs/solved_all': float((hits == n).mean()),
    'runs/uncertain': float(((hits > 0) & (hits < n)).mean()),
  }


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
  completion_length (mean generated tokens), num_seeds, count; with several seeds the multi-run
  counts per problem (`multi_run`); with greedy, the same under greedy/ (one decode).
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

  def correct(self, samples: Sequence[Sample]) -> list[bool]:
    """Per record (one sample each, in record order): the task's check of its completion."""
    return [self.task.is_correct(s.text, self.records[s.index]) for s in samples]

  def score(self, samples: Sequence[Sample]) -> dict:
    out = accuracy_by_group(self.correct(samples), self.groups, self.task.group)
    out['completion_length'] = float(np.mean([len(s.tokens) for s in samples]))
    return out

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    model = nnx.merge(graphdef, params)
    run = lambda **kw: sample_completions(model, self.tokenizer, self.prompts, **self.options, **kw)
    runs = [run(seed=s, temperature=self.temperature) for s in self.seeds]
    out = summarise_seeds([self.score(samples) for samples in runs])
    if len(runs) > 1:
      out.update(multi_run([self.correct(samples) for samples in runs]))
    if self.greedy:
      out.update({f'greedy/{k}': v for k, v in self.score(run(greedy=True)).items()})
    return out


@register_evaluator('task_accuracy')
def build(options: dict, ctx) -> TaskAccuracyEvaluator:
  """Accuracy of generations, checked by the task (ctx.task). Options: split, groups, per_group,
  seeds, temperature, greedy, batch_size; widths from config.data (prompt_len, max_new_tokens)."""
  if ctx.task is None:
    raise ValueError('evaluator task_accuracy needs a task (config.data.task)')
  records = load_eval_records(
    ctx.task,
    options['split'],
    per_group=options['per_group'],
    groups=tuple(options['groups']),
    data_dir=ctx.data.data_dir,
  )
  return TaskAccuracyEvaluator(
    ctx.task,
    records,
    ctx.tokenizer,
    seeds=tuple(options['seeds']),
    temperature=options['temperature'],
    greedy=options['greedy'],
    batch_size=options['batch_size'],
    prompt_len=ctx.data.prompt_len,
    max_new_tokens=ctx.data.max_new_tokens,
  )
