"""The early-exit trade-off of one model on held-out problems: per-layer read-outs and exit settings.

`exit_sweep(model, tokenizer, test_records, gate_records, settings, ...)`:
- per layer (final norm + shared head on its residual state; `early_exit.layer_analysis`): agreement
  of its argmax with the last layer's, top-1 accuracy and loss on the gold completions (teacher
  forced);
- per exit setting (`exit_settings`: confidence thresholds, consecutive-layer agreement, a learned
  gate fitted on frozen read-outs of `gate_records`): greedy early-exit decoding accuracy (checked
  by `is_correct(text, record)`), average layers used, the teacher-forced perplexity of the exit
  distribution, and tokens/s against normal full-depth decoding measured side by side (batch 1 and
  one batch of all problems): through `kuaijax.benchmarking.interleaved`, one warm-up call of each
  (compilation), then `timing_rounds` rounds of one early-exit and one full-depth decode in turn;
  the times are the medians over the rounds and the speed-up is the median (min, max) of the
  per-round ratios full-depth time / early-exit time (each round's two decodes share its load).
Records are task records: `prompt` and the gold `completion`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kuaijax import benchmarking, sampling
from kuaijax.data import sequences
from kuaijax.inference import early_exit


def exit_settings(
  thresholds: Sequence[float], agreement: bool, gate_thresholds: Sequence[float]
) -> list[tuple[str, str, float]]:
  """(label, rule, threshold) of every exit setting; 'full' (confidence 1.0) first; labels have no
  spaces ('conf_0.9', 'agreement', 'gate_0.7')."""
  for t in (*thresholds, *gate_thresholds):
    early_exit.check_rule('confidence', t)
  out = [('full', 'confidence', 1.0)]
  out += [(f'conf_{t}', 'confidence', float(t)) for t in thresholds if t < 1]
  if agreement:
    out.append(('agreement', 'agreement', 1.0))
  return out + [(f'gate_{t}', 'gate', float(t)) for t in gate_thresholds]


def teacher_batch(records: Sequence[dict], tokenizer, seq_len: int) -> dict:
  """Unpacked LM rows (one gold completion each) as one batch dict, loss on the completion; a
  record longer than `seq_len` is left out."""
  pairs = [(r['prompt'], r['completion']) for r in records]
  rows, _ = sequences.supervised_rows(pairs, tokenizer, seq_len, pack=False)
  if not rows:
    raise ValueError(f'no record fits score_len={seq_len}')
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def speed_row(early: benchmarking.Timing, full: benchmarking.Timing) -> dict:
  """Early-exit vs full-depth decoding timed over the same interleaved rounds: the median seconds
  of each ('early_exit_s', 'normal_s'), the speed-up as the median of the per-round ratios
  full / early ('speedup', with 'speedup_min', 'speedup_max') and every round's seconds
  ('early_exit_rounds_s', 'normal_rounds_s')."""
  ratio = benchmarking.ratio(full, early)
  return {
    'early_exit_s': early.median,
    'normal_s': full.median,
    'speedup': ratio.median,
    'speedup_min': min(ratio.values),
    'speedup_max': max(ratio.values),
    'early_exit_rounds_s': list(early.seconds),
    'normal_rounds_s': list(full.seconds),
  }


def exit_sweep(
  model,
  tokenizer,
  test_records: Sequence[dict],
  gate_records: Sequence[dict],
  settings: Sequence[tuple[str, str, float]],
  *,
  is_correct: Callable[[str, dict], bool],
  score_len: int,
  prompt_len: int,
  max_new_tokens: int,
  timing_rounds: int,
) -> dict:
  """{'num_layers', 'analysis', 'settings' (one row per setting), 'gate' (w, b)}; see the module
  docstring. A row's 'speed' holds per batch ('batch1', 'batch') `speed_row`'s keys."""
  early_exit.check_shared_head(model)
  if not test_records:
    raise ValueError('exit_sweep: no test records')
  teacher = teacher_batch(test_records, tokenizer, score_len)
  analysis = early_exit.layer_analysis(model, [teacher])
  logits = early_exit.layer_logits(
    model, teacher['inputs'], teacher['positions'], teacher['segment_ids']
  )
  mask = jnp.asarray(teacher['loss_mask'])
  nll = -jnp.take_along_axis(
    jax.nn.log_softmax(logits, axis=-1),
    jnp.broadcast_to(jnp.asarray(teacher['targets'])[None, ..., None], logits.shape[:-1] + (1,)),
    axis=-1,
  )[..., 0]
  gate = None
  if any(rule == 'gate' for _, rule, _ in settings):
    gate_rows = teacher_batch(gate_records, tokenizer, score_len)
    gate_logits = early_exit.layer_logits(
      model, gate_rows['inputs'], gate_rows['positions'], gate_rows['segment_ids']
    )
    gate = early_exit.fit_gate(gate_logits, jnp.asarray(gate_rows['loss_mask']))
  prompts, lengths = sequences.prompt_batch(
    tokenizer, [r['prompt'] for r in test_records], prompt_len
  )
  common = dict(
    max_new_tokens=max_new_tokens, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id
  )
  normal = lambda p, n: sampling.generate(model, p, n, greedy=True, **common)
  rows = []
  for label, rule, threshold in settings:
    options = dict(rule=rule, threshold=threshold, gate=gate if rule == 'gate' else None)
    out = early_exit.early_exit_generate(model, prompts, lengths, **options, **common)
    tokens, gen_lengths, used = jax.device_get((out.tokens, out.lengths, out.layers_used))
    texts = sequences.decode_completions(tokenizer, tokens, gen_lengths)
    accuracy = float(np.mean([is_correct(t, r) for t, r in zip(texts, test_records)]))
    real = np.arange(used.shape[1])[None] < gen_lengths[:, None]
    exits = early_exit.exit_layers(logits, **options)
    exit_nll = jnp.take_along_axis(nll, (exits - 1)[None], axis=0)[0]
    speed = {}
    for name, (p, n) in {'batch1': (prompts[:1], lengths[:1]), 'batch': (prompts, lengths)}.items():
      sides = {
        'early exit': lambda p=p, n=n, o=options: early_exit.early_exit_generate(
          model, p, n, **o, **common
        ),
        'full depth': lambda p=p, n=n: normal(p, n),
      }
      times = benchmarking.interleaved(sides, rounds=timing_rounds, warmup=1)
      speed[name] = speed_row(times['early exit'], times['full depth'])
    n_tokens = int(gen_lengths.sum())
    rows.append(
      {
        'setting': label,
        'rule': rule,
        'threshold': threshold,
        'accuracy': accuracy,
        'avg_layers_decode': float(used[real].mean()),
        'avg_layers_teacher_forced': float((exits * mask).sum() / mask.sum()),
        'perplexity': float(jnp.exp((exit_nll * mask).sum() / mask.sum())),
        'tokens_per_s_batch': n_tokens / speed['batch']['early_exit_s'],
        'tokens_per_s_normal_batch': n_tokens / speed['batch']['normal_s'],
        'speed': speed,
      }
    )
  return {
    'num_layers': int(model.config.num_layers),
    'analysis': analysis,
    'settings': rows,
    'gate': None if gate is None else {'w': np.asarray(gate.w).tolist(), 'b': float(gate.b)},
  }
