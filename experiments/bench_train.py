"""Training throughput and utilisation of the decoder LM, measured side by side in one process.

utilisation = (model FLOPs per step / step time) / (FLOPs/s of a large square matmul timed in the same
process, same dtype). Model FLOPs per token = 6 * (matmul params incl. the output head) + 12 * layers *
d_model * seq_len (attention scores and values, forward + backward; the causal half is not discounted).
The training loop is the real one (`kuaijax.train.trainer.train`) fed with synthetic token batches, so
data loading does not limit the number. Writes results.json, results.md and loss_curves.png into the
workdir.
"""

from __future__ import annotations

import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from kuaijax import plotting
from kuaijax.models.transformer import TransformerConfig
from kuaijax.results import write_results
from kuaijax.train import lm_task
from kuaijax.train.trainer import train


def model_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward)."""
  d, layers = cfg.d_model, cfg.num_layers
  attn = d * cfg.num_heads * cfg.head_dim * 2 + d * cfg.num_kv_heads * cfg.head_dim * 2
  mlp = 3 * d * cfg.d_ff
  matmul_params = layers * (attn + mlp) + d * cfg.vocab_size
  return 6.0 * matmul_params + 12.0 * layers * cfg.num_heads * cfg.head_dim * seq_len


def matmul_flops_per_second(n: int, dtype, repeats: int = 5) -> float:
  """Best-of-`repeats` throughput of an n x n x n matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


class _SyntheticBatches(grain.MapDataset):
  """Random full-length token rows (one document per row), deterministic by index."""

  def __init__(self, batch: int, seq_len: int, vocab: int):
    super().__init__()
    self._shape, self._vocab = (batch, seq_len), vocab

  def __len__(self):
    return 1 << 30

  def __getitem__(self, index):
    tokens = np.random.default_rng(index).integers(3, self._vocab, self._shape, dtype=np.int32)
    ones = np.ones(self._shape, np.int32)
    positions = np.broadcast_to(np.arange(self._shape[1], dtype=np.int32), self._shape)
    return {
      'inputs': tokens,
      'targets': np.roll(tokens, -1, axis=1),
      'segment_ids': ones,
      'positions': positions.copy(),
      'loss_mask': ones.astype(np.float32),
      'task_ids': np.zeros(self._shape, np.int32),
    }


def run(config, workdir: str) -> dict:
  cfg = TransformerConfig.from_config(config.model)
  seq_len = config.data.seq_len
  micro = config.train.batch_size // config.train.grad_accum // jax.process_count()
  dataset = _SyntheticBatches(micro, seq_len, cfg.vocab_size).to_iter_dataset()
  result = train(
    config,
    workdir,
    model_factory=lm_task.model_factory(config.model),
    loss_fn=lm_task.lm_loss_fn(),
    train_dataset=dataset,
  )
  # The first logged interval includes compilation: measure the rest.
  rates = [r['tokens_per_s'] for r in result.history[1:]]
  tokens_per_s = float(np.median(rates))
  flops_per_token = model_flops_per_token(cfg, seq_len)
  model_flops = tokens_per_s * flops_per_token
  peak = matmul_flops_per_second(config.bench.matmul_size, jnp.dtype(cfg.compute_dtype))
  results = {
    'device': jax.devices()[0].device_kind,
    'num_devices': len(jax.devices()),
    'tokens_per_s': tokens_per_s,
    'model_flops_per_token': flops_per_token,
    'model_flops_per_s': model_flops,
    'matmul_flops_per_s': peak,
    'utilisation': model_flops / peak,
    'd_model': cfg.d_model,
    'num_layers': cfg.num_layers,
    'seq_len': seq_len,
    'batch_size': config.train.batch_size,
    'dtype': cfg.dtype,
  }
  table = (
    '| device | d_model | layers | seq | batch | tokens/s | model TFLOP/s | matmul TFLOP/s | '
    'utilisation |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n'
    f'| {results["device"]} x{results["num_devices"]} | {cfg.d_model} | {cfg.num_layers} | '
    f'{seq_len} | {config.train.batch_size} | {tokens_per_s:,.0f} | {model_flops / 1e12:.3f} | '
    f'{peak / 1e12:.3f} | {model_flops / peak:.1%} |\n'
  )
  plotting.write_loss_curves(workdir)
  write_results(workdir, results, table)
  print(table)
  return results
