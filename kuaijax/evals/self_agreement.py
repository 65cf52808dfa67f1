"""Evaluator 'self_agreement': greedy CoT, Self-Consistency, USC and Self-Agreement accuracy vs k.

On the held-out toy questions of `kuaijax.inference.sa_toy` (kj_arith test problems with the answer
trigger: scenario 'trigger'; the same without the trigger plus unseen word questions: 'mixed'),
`kuaijax.inference.compare.compare_methods` samples k_max paths per question per sampling seed and
aggregates the first k of them by each method. Works on any model role the tokenizer fits (a toy
trained from scratch, or an imported Hugging Face model evaluated as it is, `prompts='paper'`).

Options (all required): scenarios ('trigger', 'mixed'), levels and problems_per_level (kj_arith
test problems), word_questions, train_word_examples (the training word questions to exclude),
ks, seeds (sampling seeds), temperature, top_k (0: off), max_new_tokens (per path),
prompts ('toy': the toy SFT's short instructions and last lines; 'paper': the paper's
instructions and whole solutions), aggregate_tokens (SA reply budget; USC half of it), prefix
(metric names start with it; default 'sa').

Metrics (accuracies are fractions; `<s>` a scenario, `<m>` sc | usc | sa):
  <prefix>/<s>/num_items, <prefix>/<s>/greedy/accuracy, <prefix>/<s>/greedy_texts_sample,
  <prefix>/<s>/k<k>/<m>/{accuracy, accuracy/std, accuracy/min, accuracy/max, uncertain_fraction,
  certain_count, accuracy_on_certain, num_runs} (over the sampling seeds) and
  <prefix>/<s>/k<k>/<m>/status/<status> (counted over all seeds: 'ok', SC 'no_answer', USC / SA
  parser statuses, each a fallback to the first path's answer).
"""

from __future__ import annotations

from flax import nnx

from kuaijax.evals.base import Evaluator
from kuaijax.evals.registry import register_evaluator
from kuaijax.inference import compare, sa_toy

STATS = (
  'accuracy',
  'accuracy/std',
  'accuracy/min',
  'accuracy/max',
  'uncertain_fraction',
  'certain_count',
  'accuracy_on_certain',
  'num_runs',
)


def metric_name(prefix: str, scenario: str, k: int, method: str, stat: str) -> str:
  return f'{prefix}/{scenario}/k{k}/{method}/{stat}'


class SelfAgreementEvaluator(Evaluator):
  """`compare.compare_methods` on every scenario's items; flat metrics (module docstring)."""

  def __init__(self, items: dict, tokenizer, *, seeds, ks, prefix: str = 'sa', **options):
    self.items, self.tokenizer, self.prefix = dict(items), tokenizer, prefix
    if not self.items or not all(self.items.values()):
      raise ValueError(f'self_agreement: a scenario without items ({sorted(self.items)})')
    self.seeds, self.ks = tuple(seeds), compare.check_ks(ks)
    self.options = options

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    model = nnx.merge(graphdef, params)
    out = {}
    for scenario, items in self.items.items():
      r = compare.compare_methods(
        model, self.tokenizer, items, seeds=self.seeds, ks=self.ks, **self.options
      )
      base = f'{self.prefix}/{scenario}'
      out[f'{base}/num_items'] = r['num_items']
      out[f'{base}/greedy/accuracy'] = r['by_k'][self.ks[0]]['greedy']['accuracy']
      out[f'{base}/greedy_texts_sample'] = r['greedy_texts_sample']
      for k, row in r['by_k'].items():
        for method in ('sc', 'usc', 'sa'):
          cell = row[method]
          for stat in STATS:
            out[metric_name(self.prefix, scenario, k, method, stat)] = cell[stat]
          for status, n in cell['status'].items():
            out[metric_name(self.prefix, scenario, k, method, f'status/{status}')] = n
    return out


def statuses(metrics: dict, prefix: str, scenario: str, k: int, method: str) -> dict[str, int]:
  """The counted statuses of one cell from the flat metrics."""
  head = metric_name(prefix, scenario, k, method, 'status/')
  return {key.removeprefix(head): int(v) for key, v in metrics.items() if key.startswith(head)}


@register_evaluator('self_agreement')
def build(options: dict, ctx) -> SelfAgreementEvaluator:
  scenarios = tuple(options['scenarios'])
  unknown = sorted(set(scenarios) - set(sa_toy.SCENARIOS))
  if unknown or not scenarios:
    raise ValueError(f'self_agreement: scenarios {scenarios} must be among {sa_toy.SCENARIOS}')
  items = sa_toy.eval_items(
    levels=tuple(options['levels']),
    problems_per_level=options['problems_per_level'],
    word_questions=options['word_questions'],
    train_word_examples=options['train_word_examples'],
    data_dir=ctx.data.data_dir if ctx.data is not None else '',
  )
  return SelfAgreementEvaluator(
    {s: items[s] for s in scenarios},
    ctx.tokenizer,
    seeds=tuple(options['seeds']),
    ks=tuple(options['ks']),
    prefix=options.get('prefix', 'sa'),
    temperature=options['temperature'],
    top_k=options['top_k'] or None,
    max_new_tokens=options['max_new_tokens'],
    prompting=sa_toy.aggregation_prompting(options['prompts']),
    aggregate_tokens=options['aggregate_tokens'],
  )
