"""Early exit without extra heads on a small kj_arith model: per-layer analysis and the trade-off.

SFT a small byte-level model on kj_arith gold solutions, then on held-out test problems:
- per layer (final norm + shared head on its residual state): agreement of its argmax with the last
  layer's, top-1 accuracy and loss on the gold solution tokens (teacher forced);
- per exit setting (confidence thresholds, consecutive-layer agreement, a learned gate fitted on
  frozen features of TRAINING solutions): greedy early-exit decoding accuracy, average layers used,
  tokens/s against normal full-depth decoding measured side by side (batch 1 and one batch of
  all problems), and the teacher-forced perplexity of the exit distribution.
Writes results.json, results.md, layers.png, tradeoff.png and loss_curves.png.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from kuaijax import plotting, sampling
from kuaijax.data import arith, sequences, tasks, tokenizers
from kuaijax.inference import early_exit
from kuaijax.train import lm_task
from kuaijax.train.trainer import write_results


def _settings(config) -> list[tuple[str, str, float]]:
  """(label, rule, threshold) of every exit setting; 'full' (confidence 1.0) first."""
  for t in (*config.exit.thresholds, *config.exit.gate_thresholds):
    early_exit.check_rule('confidence', t)
  out = [('full', 'confidence', 1.0)]
  out += [(f'conf {t}', 'confidence', float(t)) for t in config.exit.thresholds if t < 1]
  if config.exit.agreement:
    out.append(('agreement', 'agreement', 1.0))
  return out + [(f'gate {t}', 'gate', float(t)) for t in config.exit.gate_thresholds]


def _batches(problems, tokenizer, seq_len):
  """Unpacked LM rows (one gold solution each) as one batch dict, loss on the solution."""
  pairs = [(arith.format_prompt(p.question), p.solution) for p in problems]
  rows, _ = sequences.supervised_rows(pairs, tokenizer, seq_len, pack=False)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _timed(fn, repeats: int) -> float:
  """Best wall time of `repeats` calls (after one warm-up call that compiles)."""
  jax.block_until_ready(fn())
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  settings = _settings(config)
  dc, ec = config.data, config.eval
  tokenizer = tokenizers.get_tokenizer(dc.tokenizer, spm_model_path=dc.spm_model_path or None)
  train_problems = tasks.load_arith_problems(
    'train', levels=tuple(dc.train_levels), limit=dc.train_examples or 0, data_dir=dc.data_dir
  )
  pairs = [(arith.format_prompt(p.question), p.solution) for p in train_problems]
  result, _, _ = lm_task.train_on_pairs(config, os.path.join(workdir, 'sft'), pairs, tokenizer)
  train_s = time.time() - start
  model = result.model()
  num_layers = config.model.num_layers
  test = []
  for level in ec.levels:
    test += tasks.load_arith_problems(
      'test', levels=(level,), limit=ec.problems_per_level, data_dir=dc.data_dir
    )
  teacher = _batches(test, tokenizer, ec.score_len)
  analysis = early_exit.layer_analysis(model, [teacher])
  logits = early_exit.layer_logits(
    model, teacher['inputs'], teacher['positions'], teacher['segment_ids']
  )
  mask = jnp.asarray(teacher['loss_mask'])
  gate_rows = _batches(train_problems[: ec.gate_problems], tokenizer, ec.score_len)
  gate_logits = early_exit.layer_logits(
    model, gate_rows['inputs'], gate_rows['positions'], gate_rows['segment_ids']
  )
  gate = early_exit.fit_gate(gate_logits, jnp.asarray(gate_rows['loss_mask']))
  prompts, lengths = sequences.prompt_batch(
    tokenizer, [arith.format_prompt(p.question) for p in test], ec.prompt_len
  )
  common = dict(
    max_new_tokens=ec.max_new_tokens, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id
  )
  normal = lambda p, n: sampling.generate(model, p, n, greedy=True, **common)
  rows = []
  for label, rule, threshold in settings:
    options = dict(rule=rule, threshold=threshold, gate=gate if rule == 'gate' else None)
    out = early_exit.early_exit_generate(model, prompts, lengths, **options, **common)
    tokens, gen_lengths, used = jax.device_get((out.tokens, out.lengths, out.layers_used))
    texts = sequences.decode_completions(tokenizer, tokens, gen_lengths)
    accuracy = float(np.mean([arith.check_answer(t, p.answer) for t, p in zip(texts, test)]))
    real = np.arange(used.shape[1])[None] < gen_lengths[:, None]
    exits = early_exit.exit_layers(logits, **options)
    nll = -jnp.take_along_axis(
      jax.nn.log_softmax(logits, axis=-1),
      jnp.broadcast_to(jnp.asarray(teacher['targets'])[None, ..., None], logits.shape[:-1] + (1,)),
      axis=-1,
    )[..., 0]
    exit_nll = jnp.take_along_axis(nll, (exits - 1)[None], axis=0)[0]
    ppl = float(jnp.exp((exit_nll * mask).sum() / mask.sum()))
    tf_layers = float((exits * mask).sum() / mask.sum())
    speed = {}
    for name, (p, n) in {'batch1': (prompts[:1], lengths[:1]), 'batch': (prompts, lengths)}.items():
      ee = lambda p=p, n=n, o=options: early_exit.early_exit_generate(model, p, n, **o, **common)
      t_ee = _timed(ee, ec.timing_repeats)
      t_full = _timed(lambda p=p, n=n: normal(p, n), ec.timing_repeats)
      speed[name] = {'early_exit_s': t_ee, 'normal_s': t_full, 'speedup': t_full / t_ee}
    n_tokens = int(gen_lengths.sum())
    rows.append(
      {
        'setting': label,
        'rule': rule,
        'threshold': threshold,
        'accuracy': accuracy,
        'avg_layers_decode': float(used[real].mean()),
        'avg_layers_teacher_forced': tf_layers,
        'perplexity': ppl,
        'tokens_per_s_batch': n_tokens / speed['batch']['early_exit_s'],
        'tokens_per_s_normal_batch': n_tokens / speed['batch']['normal_s'],
        'speed': speed,
      }
    )
    print(rows[-1])
  results = {
    'num_layers': num_layers,
    'analysis': analysis,
    'settings': rows,
    'gate': {'w': np.asarray(gate.w).tolist(), 'b': float(gate.b)},
    'train': {'steps': result.step, 'wall_s': train_s},
    'num_params': int(sum(x.size for x in jax.tree.leaves(result.params))),
    'num_test_problems': len(test),
  }
  results['plots'] = plot(results, workdir)
  results['wall_s'] = time.time() - start
  table = results_table(results, config)
  write_results(workdir, results, table)
  print(table)
  return results


def results_table(results: dict, config) -> str:
  a, L = results['analysis'], results['num_layers']
  lines = [
    f'## Per-layer read-out through the final norm + shared head ({a["tokens"]} held-out solution '
    'tokens, teacher forced)',
    '',
    '| layer | agreement with last layer | top-1 accuracy | loss | mean max prob |',
    '|---:|---:|---:|---:|---:|',
  ]
  for i in range(L):
    lines.append(
      f'| {i + 1} | {100 * a["agreement"][i]:.1f}% | {100 * a["accuracy"][i]:.1f}% | '
      f'{a["loss"][i]:.3f} | {a["confidence"][i]:.3f} |'
    )
  lines += [
    '',
    f'## Early-exit decoding, {results["num_test_problems"]} held-out problems (greedy; speed-up = '
    'normal full-depth decoding time / early-exit time, side by side, best of '
    f'{config.eval.timing_repeats})',
    '',
    '| setting | avg layers (decode) | accuracy | perplexity (TF) | avg layers (TF) | speed-up batch 1 '
    '| speed-up batch | tokens/s (batch) | normal tokens/s |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for r in results['settings']:
    lines.append(
      f'| {r["setting"]} | {r["avg_layers_decode"]:.2f} / {L} | {100 * r["accuracy"]:.1f}% | '
      f'{r["perplexity"]:.3f} | {r["avg_layers_teacher_forced"]:.2f} | '
      f'{r["speed"]["batch1"]["speedup"]:.2f}x | {r["speed"]["batch"]["speedup"]:.2f}x | '
      f'{r["tokens_per_s_batch"]:.0f} | {r["tokens_per_s_normal_batch"]:.0f} |'
    )
  lines += [
    '',
    'TF = teacher forced on the gold solutions (every layer sees full-depth context there; the '
    'decoding columns use the propagated exit states). Training: '
    f'{results["train"]["steps"]} steps, {results["train"]["wall_s"]:.0f} s; total {results["wall_s"]:.0f} s.',
  ]
  return '\n'.join(lines) + '\n'


def plot(results: dict, workdir: str) -> list[str]:
  a, L = results['analysis'], results['num_layers']
  layers = np.arange(1, L + 1)
  fig = Figure(figsize=(9, 3.5))
  ax = fig.add_subplot(1, 2, 1)
  ax.plot(layers, 100 * np.array(a['agreement']), marker='o', label='agreement with last layer')
  ax.plot(layers, 100 * np.array(a['accuracy']), marker='o', label='top-1 accuracy')
  ax.set(xlabel='layer', ylabel='%', title='per-layer read-out')
  ax.legend()
  ax = fig.add_subplot(1, 2, 2)
  ax.plot(layers, a['loss'], marker='o')
  ax.set(xlabel='layer', ylabel='loss (nats)', title='per-layer loss')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'layers.png'), dpi=80)
  fig = Figure(figsize=(9, 3.5))
  rows = results['settings']
  for j, (key, label) in enumerate((('accuracy', 'accuracy'), ('perplexity', 'perplexity (TF)'))):
    ax = fig.add_subplot(1, 2, j + 1)
    x = [r['speed']['batch1']['speedup'] for r in rows]
    y = [100 * r[key] if key == 'accuracy' else r[key] for r in rows]
    ax.plot(x, y, 'o')
    for r, xi, yi in zip(rows, x, y):
      ax.annotate(r['setting'], (xi, yi), fontsize=7)
    ax.set(xlabel='speed-up vs full decoding (batch 1)', ylabel=label)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'tradeoff.png'), dpi=80)
  plotting.write_loss_curves(workdir, ['sft'])
  return ['layers.png', 'tradeoff.png', 'loss_curves.png']
