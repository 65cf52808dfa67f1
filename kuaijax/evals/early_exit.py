"""Evaluator 'early_exit': per-layer read-outs and the early-exit trade-off on held-out task records.

`kuaijax.inference.exit_sweep.exit_sweep` on `per_group` test records of each of `groups` (kj_arith
levels) of the config's task: per layer, agreement with the last layer, top-1 accuracy and loss
(teacher forced on the gold completions); per exit setting (confidence `thresholds`, `agreement`,
a gate fitted on `gate_problems` TRAINING records of the config's `data.levels` and exiting at
`gate_thresholds`), greedy early-exit decoding accuracy (the task's check), average layers used,
teacher-forced perplexity and speed against normal full-depth decoding (`timing_rounds`
interleaved rounds through `kuaijax.benchmarking`, after one warm-up call of each). Any kuaijax
Transformer with a vanilla layer stack works, an imported Hugging Face model included.

Options (all required): split, groups, per_group, thresholds, agreement, gate_thresholds,
gate_problems, score_len (teacher-forced rows), prompt_len, max_new_tokens, timing_rounds.

Metrics: early_exit/num_layers, early_exit/tokens (scored solution tokens), early_exit/layers/
{agreement, accuracy, loss, confidence} (lists over layers), early_exit/settings (the setting
labels in order: 'full', 'conf_<t>', 'agreement', 'gate_<t>'), per setting early_exit/<label>/
{accuracy, avg_layers_decode, avg_layers_teacher_forced, perplexity, tokens_per_s_batch,
tokens_per_s_normal_batch, threshold} (tokens/s at the median times) and
early_exit/<label>/{batch1, batch}/{early_exit_s, normal_s (median seconds), speedup, speedup_min,
speedup_max (median, min, max of the per-round ratios normal / early exit), early_exit_rounds_s,
normal_rounds_s (every round's seconds)}; early_exit/gate/w and early_exit/gate/b when a gate was
fitted.
"""

from __future__ import annotations

from flax import nnx

from kuaijax.evals.base import Evaluator
from kuaijax.evals.registry import register_evaluator
from kuaijax.evals.task_accuracy import load_eval_records
from kuaijax.inference import exit_sweep

PREFIX = 'early_exit'
ROW_KEYS = (
  'accuracy',
  'avg_layers_decode',
  'avg_layers_teacher_forced',
  'perplexity',
  'tokens_per_s_batch',
  'tokens_per_s_normal_batch',
  'threshold',
)


class EarlyExitEvaluator(Evaluator):
  def __init__(self, task, test_records, gate_records, tokenizer, settings, **options):
    self.task, self.tokenizer, self.settings = task, tokenizer, list(settings)
    self.test_records, self.gate_records = list(test_records), list(gate_records)
    self.options = options

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    model = nnx.merge(graphdef, params)
    r = exit_sweep.exit_sweep(
      model,
      self.tokenizer,
      self.test_records,
      self.gate_records,
      self.settings,
      is_correct=self.task.is_correct,
      **self.options,
    )
    a = r['analysis']
    out = {
      f'{PREFIX}/num_layers': r['num_layers'],
      f'{PREFIX}/tokens': a['tokens'],
      f'{PREFIX}/num_test_problems': len(self.test_records),
      f'{PREFIX}/settings': [row['setting'] for row in r['settings']],
    }
    for key in ('agreement', 'accuracy', 'loss', 'confidence'):
      out[f'{PREFIX}/layers/{key}'] = a[key]
    for row in r['settings']:
      head = f'{PREFIX}/{row["setting"]}'
      out.update({f'{head}/{key}': row[key] for key in ROW_KEYS})
      for batch, speed in row['speed'].items():
        out.update({f'{head}/{batch}/{key}': value for key, value in speed.items()})
    if r['gate'] is not None:
      out[f'{PREFIX}/gate/w'], out[f'{PREFIX}/gate/b'] = r['gate']['w'], r['gate']['b']
    return out


@register_evaluator('early_exit')
def build(options: dict, ctx) -> EarlyExitEvaluator:
  if ctx.task is None:
    raise ValueError('evaluator early_exit needs a task (config.data.task)')
  settings = exit_sweep.exit_settings(
    tuple(options['thresholds']), bool(options['agreement']), tuple(options['gate_thresholds'])
  )
  data_dir = ctx.data.data_dir
  test = load_eval_records(
    ctx.task,
    options['split'],
    per_group=options['per_group'],
    groups=tuple(options['groups']),
    data_dir=data_dir,
  )
  gate = []
  if options['gate_thresholds']:
    levels = tuple(ctx.data.get('levels', ()) or ())
    gate = ctx.task.load(
      'train',
      data_dir=data_dir,
      limit=options['gate_problems'],
      **({'levels': levels} if levels else {}),
    )
  return EarlyExitEvaluator(
    ctx.task,
    test,
    gate,
    ctx.tokenizer,
    settings,
    score_len=options['score_len'],
    prompt_len=options['prompt_len'],
    max_new_tokens=options['max_new_tokens'],
    timing_rounds=options['timing_rounds'],
  )
