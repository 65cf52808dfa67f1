"""Perplexity of a Hugging Face model folder on a JSONL file, plus greedy generations; for MoE
models optionally a Top-P routing sweep (mean experts per token and perplexity per p).

See configs/hf/eval.py for the command. Every text is one row (no packing); padded rows and
positions carry segment 0 and no loss. Scores come from `sampling.score`, experts per token from the
MoE-stats evaluator.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from kuaijax import parallel, sampling
from kuaijax.evals.moe_stats import MoEStatsEvaluator
from kuaijax.hf import model_io
from kuaijax.hf.tokenizer import HFTokenizer
from kuaijax.results import write_results


def read_texts(path: str, max_texts: int = 0) -> list[str]:
  """The "text" fields of a JSONL file (errors name the file and line)."""
  if not path:
    raise ValueError('config.eval_file is required (a JSONL file with a "text" field per line)')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.eval_file={path!r} does not exist')
  texts = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number}: not valid JSON ({e})') from None
      if not isinstance(record, dict) or not isinstance(record.get('text'), str):
        raise ValueError(f'{path}:{number}: needs a JSON object with a string "text" field')
      texts.append(record['text'])
      if max_texts and len(texts) >= max_texts:
        break
  if not texts:
    raise ValueError(f'{path}: no texts')
  return texts


def text_batches(token_lists: list[np.ndarray], batch_size: int) -> list[dict]:
  """One text per row, padded to a common width; loss on every next-token prediction."""
  width = max(2, max(len(t) for t in token_lists))
  batches = []
  for start in range(0, len(token_lists), batch_size):
    rows = token_lists[start : start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    for i, row in enumerate(rows):
      tokens[i, : len(row)] = row
      segments[i, : len(row)] = 1
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    loss_mask = (segments * np.concatenate([segments[:, 1:], 0 * segments[:, :1]], 1)).astype(
      np.float32
    )
    batches.append(
      dict(
        inputs=tokens,
        targets=targets,
        loss_mask=loss_mask,
        segment_ids=segments,
        positions=np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy(),
        task_ids=np.zeros_like(tokens),
      )
    )
  return batches


def score_texts(model, batches, mesh, rules) -> tuple[np.ndarray, np.ndarray]:
  """Summed next-token NLL and the number of predictions at each position, over all texts."""
  graphdef, state = nnx.split(model, nnx.Param)

  @jax.jit
  def token_nll(params, batch):
    logps, _ = sampling.score(
      nnx.merge(graphdef, params),
      batch['inputs'],
      loss_mask=batch['loss_mask'],
      segment_ids=batch['segment_ids'],
    )
    return -logps

  params = nnx.to_pure_dict(state)
  sums = counts = 0.0
  with parallel.axis_rules(mesh, rules):
    for batch in batches:
      nll = jax.device_get(token_nll(params, parallel.shard_batch(batch, mesh, rules)))
      sums = sums + np.asarray(nll, np.float64).sum(0)
      counts = counts + batch['loss_mask'].sum(0)
  return sums, counts


def greedy_samples(model, tokenizer, token_lists, config) -> list[dict]:
  """Greedy continuations of the first half (<= prompt_tokens) of the first texts (one batch)."""
  heads = [t[: max(1, min(len(t) // 2, int(config.prompt_tokens)))] for t in token_lists]
  heads = heads[: int(config.num_generations)]
  if not heads:
    return []
  prompts = np.zeros((len(heads), max(len(h) for h in heads)), np.int32)
  for i, h in enumerate(heads):
    prompts[i, : len(h)] = h
  gen = sampling.generate(
    model,
    prompts,
    [len(h) for h in heads],
    max_new_tokens=int(config.max_new_tokens),
    greedy=True,
    stop_tokens=[tokenizer.eos_id] if tokenizer.eos_id >= 0 else [],
    pad_id=max(tokenizer.pad_id, 0),
  )
  return [
    dict(prompt=tokenizer.decode(h), completion=tokenizer.decode(c))
    for h, c in zip(heads, gen.to_lists(), strict=True)
  ]


def _plot(workdir: str, name: str, xs, ys_list, labels, title, xlabel, ylabel) -> str:
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  for ys, label in zip(ys_list, labels, strict=True):
    ax.plot(xs, ys, marker='o' if len(xs) < 30 else None, label=label)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.grid(alpha=0.3)
  if len(labels) > 1:
    ax.legend()
  path = os.path.join(workdir, name)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  return path


def top_p_sweep(config, texts_batches, tokens: int, mesh, rules, ps) -> list[dict]:
  """Perplexity and experts per token with routing='top_p' (k_max = all experts) at each p."""
  cfg, _ = model_io.model_config(config.hf_path, dtype=config.dtype)
  num_experts = dict(cfg.mlp_kwargs).get('num_experts')
  if not num_experts:
    raise ValueError('config.top_p_sweep needs an MoE model (mixtral, qwen2_moe, qwen3_moe)')
  rows = []
  for p in ps:
    options = dict(routing='top_p', p=p, k_max=num_experts)
    model = model_io.load_model(
      config.hf_path, dtype=config.dtype, overrides={'mlp_options': options}, mesh=mesh, rules=rules
    )
    nll = float(score_texts(model, texts_batches, mesh, rules)[0].sum() / tokens)
    stats = MoEStatsEvaluator(texts_batches, ('text',), mesh=mesh, rules=rules)(model)
    layers = sorted(
      int(k.split('/')[1][5:]) for k in stats if k.startswith('moe/layer') and k.endswith('mean_k')
    )
    rows.append(
      dict(
        p=p,
        mean_nll=nll,
        perplexity=math.exp(nll),
        experts_per_token=stats['experts_per_token'],
        layer_mean_k=[stats[f'moe/layer{i}/mean_k'] for i in layers],
      )
    )
  return rows


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  texts = read_texts(config.eval_file, int(config.max_texts))
  tokenizer = HFTokenizer(config.hf_path)
  mesh = parallel.mesh_from_config(config.parallel)
  rules = parallel.rules_dict(config.parallel.rules)
  model = model_io.load_model(config.hf_path, dtype=config.dtype, mesh=mesh, rules=rules)
  max_len = int(config.max_len)
  encoded = [tokenizer.encode_array(t) for t in texts]
  truncated = sum(len(t) > max_len for t in encoded)
  token_lists = [t[:max_len] for t in encoded]
  if any(len(t) < 2 for t in token_lists):
    short = [i for i, t in enumerate(token_lists) if len(t) < 2]
    raise ValueError(f'{config.eval_file}: texts {short[:5]} have fewer than 2 tokens')
  batches = text_batches(token_lists, int(config.batch_size))
  sums, counts = score_texts(model, batches, mesh, rules)
  mean_nll = float(sums.sum() / counts.sum())
  by_position = sums / np.maximum(counts, 1)
  samples = greedy_samples(model, tokenizer, token_lists, config)
  results = dict(
    model_type=model_io.read_config(config.hf_path)['model_type'],
    mean_nll=mean_nll,
    perplexity=math.exp(mean_nll),
    tokens=int(counts.sum()),
    texts=len(texts),
    truncated_texts=int(truncated),
    generations=samples,
  )
  plots = [
    _plot(
      workdir,
      'nll_by_position.png',
      np.arange(len(by_position) - 1),
      [by_position[:-1]],
      ['nll'],
      'next-token NLL by position',
      'position',
      'mean NLL (nats)',
    )
  ]
  lines = [
    f'## {results["model_type"]} from {config.hf_path}',
    '',
    '| texts | tokens | mean NLL (nats) | perplexity | truncated |',
    '|---:|---:|---:|---:|---:|',
    f'| {len(texts)} | {results["tokens"]} | {results["mean_nll"]:.4f} | '
    f'{results["perplexity"]:.3f} | {truncated} |',
  ]
  ps = [float(p) for p in str(config.top_p_sweep).split(',') if p.strip()]
  if ps:
    sweep = top_p_sweep(config, batches, results['tokens'], mesh, rules, ps)
    results['top_p_sweep'] = sweep
    lines += [
      '',
      '### Top-P routing on the pretrained MoE (k_max = all experts)',
      '',
      '| p | experts per token | per layer | mean NLL | perplexity |',
      '|---:|---:|---|---:|---:|',
    ]
    for row in sweep:
      per_layer = ', '.join(f'{k:.2f}' for k in row['layer_mean_k'])
      lines.append(
        f'| {row["p"]:g} | {row["experts_per_token"]:.2f} | {per_layer} | '
        f'{row["mean_nll"]:.4f} | {row["perplexity"]:.3f} |'
      )
    xs = [r['p'] for r in sweep]
    plots.append(
      _plot(
        workdir,
        'top_p_sweep.png',
        xs,
        [[r['experts_per_token'] for r in sweep], [r['perplexity'] for r in sweep]],
        ['experts per token', 'perplexity'],
        'Top-P routing on a pretrained MoE',
        'p',
        'value',
      )
    )
  lines += ['', '### Greedy generations', '']
  for s in samples:
    lines.append(f'- prompt: `{s["prompt"]!r}`\n  completion: `{s["completion"]!r}`')
  results['plots'] = [os.path.basename(p) for p in plots]
  write_results(workdir, results, '\n'.join(lines) + '\n')
  return results
