"""Training throughput of the decoder LM against transformers, side by side in one process.

Sides, interleaved through `kuaijax.benchmarking` (each round runs `bench.steps_per_round` training
steps of each side on the same synthetic batch, wall clock, warm-up excluded):
- `kuaijax`: the trainer's own jitted step (`trainer.train_program(...).step`: loss, grad, AdamW,
  the non-finite guard), on the configured mesh;
- `transformers` (when torch and transformers are installed and `bench.transformers` is set): a
  `LlamaForCausalLM` of the same shape (RMSNorm, RoPE, SwiGLU, tied embeddings, sdpa attention) with
  `torch.optim.AdamW` on the same hyper-parameters, torch given XLA's thread count;
- `matmul`: an n x n x n matmul in the model's dtype, the utilisation reference timed in the same
  rounds (so it sees the same load).
utilisation = model FLOPs per second / matmul FLOPs per second. Model FLOPs per token = 6 * (matmul
params incl. the output head) + 12 * layers * d_model * seq_len (attention scores and values,
forward + backward; the causal half is not discounted). Writes results.json and results.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kuaijax import benchmarking, parallel
from kuaijax.models.transformer import TransformerConfig
from kuaijax.results import write_results
from kuaijax.train import lm_task
from kuaijax.train.trainer import train_program


def model_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward)."""
  d, layers = cfg.d_model, cfg.num_layers
  attn = d * cfg.num_heads * cfg.head_dim * 2 + d * cfg.num_kv_heads * cfg.head_dim * 2
  mlp = 3 * d * cfg.d_ff
  matmul_params = layers * (attn + mlp) + d * cfg.vocab_size
  return 6.0 * matmul_params + 12.0 * layers * cfg.num_heads * cfg.head_dim * seq_len


def kuaijax_side(config, batch: dict, steps: int):
  """A zero-argument callable running `steps` of the trainer's step; returns the last loss."""
  program = train_program(config, lm_task.model_factory(config.model), lm_task.lm_loss_fn())
  layout = program.layout
  with parallel.axis_rules(layout.mesh, layout.rules):
    state = {'train': program.init_state(program.init_params())}
    sharded = parallel.shard_batch(batch, layout.mesh, layout.rules, 0)

  def run():
    with parallel.axis_rules(layout.mesh, layout.rules):
      for _ in range(steps):
        state['train'], metrics = program.step(state['train'], sharded, None)
    return metrics['loss']

  return run


def transformers_side(config, batch: dict, steps: int):
  """The same shape as a transformers Llama trained with torch AdamW (None if not installed)."""
  try:
    import torch  # noqa: PLC0415  (reference dependency)
    import transformers  # noqa: PLC0415
  except ImportError:
    return None
  benchmarking.match_torch_threads()
  cfg = TransformerConfig.from_config(config.model)
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    intermediate_size=cfg.d_ff,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    rms_norm_eps=cfg.norm_eps,
    rope_theta=cfg.rope_base,
    max_position_embeddings=batch['inputs'].shape[1],
    tie_word_embeddings=cfg.tie_embeddings,
    attn_implementation='sdpa',
    torch_dtype=torch.float32,
  )
  model = transformers.LlamaForCausalLM(hf_config).train()
  oc = config.optimizer
  optimizer = torch.optim.AdamW(
    model.parameters(),
    lr=float(oc.lr),
    betas=(float(oc.b1), float(oc.b2)),
    eps=float(oc.eps),
    weight_decay=float(oc.weight_decay),
  )
  inputs = torch.from_numpy(batch['inputs']).long()
  targets = torch.from_numpy(batch['targets']).long()

  def run():
    for _ in range(steps):
      optimizer.zero_grad(set_to_none=True)
      logits = model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
      loss.backward()
      if oc.clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(oc.clip_norm))
      optimizer.step()
    return loss.detach()

  return run


def run(config, workdir: str) -> dict:
  b = config.bench
  cfg = TransformerConfig.from_config(config.model)
  seq_len, batch_size, steps = config.data.seq_len, config.train.batch_size, b.steps_per_round
  batch = benchmarking.synthetic_lm_batch(batch_size, seq_len, cfg.vocab_size)
  sides = {'kuaijax': kuaijax_side(config, batch, steps)}
  torch_run = transformers_side(config, batch, steps) if b.transformers else None
  if torch_run is not None:
    sides['transformers'] = torch_run
  n = b.matmul_size
  dtype = jnp.dtype(cfg.compute_dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  sides['matmul'] = lambda: matmul(a)
  times = benchmarking.interleaved(sides, rounds=b.rounds, warmup=b.warmup)
  tokens = steps * batch_size * seq_len
  flops_per_token = model_flops_per_token(cfg, seq_len)
  matmul_flops = 2.0 * n**3 / times['matmul'].median
  results = {
    'device': jax.devices()[0].device_kind,
    'num_devices': len(jax.devices()),
    'threads': benchmarking.thread_counts(),
    'command': benchmarking.command_line(),
    'd_model': cfg.d_model,
    'num_layers': cfg.num_layers,
    'seq_len': seq_len,
    'batch_size': batch_size,
    'dtype': cfg.dtype,
    'tokens_per_round': tokens,
    'model_flops_per_token': flops_per_token,
    'matmul_flops_per_s': matmul_flops,
    'sides': {},
  }
  rows = []
  for name in sides:
    if name == 'matmul':
      continue
    t = times[name]
    tokens_per_s = tokens / t.median
    side = {
      **t.summary(),
      'tokens_per_s': tokens_per_s,
      'utilisation': tokens_per_s * flops_per_token / matmul_flops,
      'ratio_to_kuaijax': benchmarking.ratio(t, times['kuaijax']).summary(),
    }
    results['sides'][name] = side
    rows.append(f'| {name} | {t.rate_cells(tokens)} | {side["utilisation"]:.1%} |')
  results['tokens_per_s'] = results['sides']['kuaijax']['tokens_per_s']
  results['utilisation'] = results['sides']['kuaijax']['utilisation']
  what = (
    f'Training step, d_model {cfg.d_model}, {cfg.num_layers} layers, seq {seq_len}, batch '
    f'{batch_size}, {cfg.dtype}, AdamW, {steps} steps per round on {results["device"]} '
    f'x{results["num_devices"]}'
  )
  table = benchmarking.header(what, rounds=b.rounds, warmup=b.warmup)
  table += '| side | tokens/s (median) | min-max | utilisation |\n|---|---:|---:|---:|\n'
  table += '\n'.join(rows) + '\n'
  table += f'\nmatmul {n}^3 {cfg.dtype}: {matmul_flops / 1e12:.3f} TFLOP/s (median).\n'
  if 'transformers' in times:
    speedup = benchmarking.ratio(times['transformers'], times['kuaijax'])
    results['speedup_vs_transformers'] = speedup.summary()
    table += f'kuaijax vs transformers, tokens/s: {speedup.text()} (per-round ratios).\n'
  write_results(workdir, results, table)
  print(table)
  return results
