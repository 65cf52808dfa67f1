"""Memory and speed of a LoRA training step against a full fine-tuning step on the same model.

Sides (each the trainer's own jitted step, `trainer.train_program(...).step`: loss, grad, AdamW,
the non-finite guard, on the configured mesh, one synthetic batch):
- `full`: every parameter trained, the model section as configured (`model.param_dtype`);
- `lora`: LoRA adapters (`config.lora`) on the same model, the base frozen in `model.param_dtype`;
- `lora_<dtype>` for each dtype in `bench.lora_base_dtypes`: the same adapters on a base stored in
  that dtype (e.g. a bfloat16 base; the adapters stay float32).

Per side, deterministic (no timing): trainable and total parameters, the bytes of the parameters,
of the trainable ones and of the optimizer state (AdamW: two float32 moments per trainable float
plus step counters), the live-buffer bytes the side keeps between steps (its train state: every
distinct device buffer), and XLA's compiled memory analysis of the step
(`jitted.lower(...).compile().memory_analysis()`: argument, output, alias, temporary bytes and
the footprint arguments + outputs - donated + temporaries; the backend's own peak figure is
recorded too). Timed through `kuaijax.benchmarking.interleaved` (each round runs `bench.steps_per_round`
steps of every side in turn, wall clock, warm-up excluded): tokens/s, and the per-round speed ratio
of each side to `full`. Writes results.json and results.md.
"""

from __future__ import annotations

import math

import jax
import ml_collections

from kuaijax import benchmarking, parallel
from kuaijax.models import lora
from kuaijax.models.transformer import TransformerConfig
from kuaijax.results import write_results
from kuaijax.train import lm_task
from kuaijax.train.trainer import train_program

FULL, LORA = 'full', 'lora'
MEMORY_FIELDS = ('argument', 'output', 'alias', 'temp')


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def live_bytes(tree) -> int:
  """Bytes of the distinct device buffers (all shards) that `tree`'s arrays hold."""
  seen, total = set(), 0
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      buffer = shard.data
      key = buffer.unsafe_buffer_pointer()
      if key not in seen:
        seen.add(key)
        total += buffer.nbytes
  return total


def compiled_memory(stats) -> dict:
  """The compiled step's memory analysis in bytes ({} where the backend gives none).

  `footprint` = arguments + outputs - aliased (donated) buffers + temporaries: an upper bound of
  what the step holds at once. `peak_memory` is the backend's own figure (on CPU it leaves the
  temporaries out).
  """
  if stats is None:
    return {}
  out = {name: int(getattr(stats, f'{name}_size_in_bytes', 0)) for name in MEMORY_FIELDS}
  out['peak_memory'] = int(getattr(stats, 'peak_memory_in_bytes', 0))
  out['footprint'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def side_configs(config) -> dict[str, tuple]:
  """{side: (model section, lora section or None)} of the compared steps."""
  sides = {FULL: (config.model, None), LORA: (config.model, config.lora)}
  for dtype in config.bench.lora_base_dtypes:
    if dtype != config.model.param_dtype:
      model = ml_collections.ConfigDict(config.model.to_dict())
      model.param_dtype = dtype
      sides[f'{LORA}_{dtype}'] = (model, config.lora)
  return sides


def build_side(config, model_section, lora_section, batch: dict, steps: int):
  """(zero-argument callable running `steps` train steps, the side's deterministic figures)."""
  factory = lm_task.model_factory(model_section, lora_section)
  program = train_program(config, factory, lm_task.lm_loss_fn())
  layout = program.layout
  with parallel.axis_rules(layout.mesh, layout.rules):
    state = {'train': program.init_state(program.init_params())}
    sharded = parallel.shard_batch(batch, layout.mesh, layout.rules, 0)
    stats = program.step.lower(state['train'], sharded, None).compile().memory_analysis()
  trainable = lora.trainable_split(layout.abstract_params)[0]
  figures = {
    'params': _size(layout.abstract_params),
    'trainable_params': _size(trainable),
    'param_bytes': _bytes(layout.abstract_params),
    'trainable_param_bytes': _bytes(trainable),
    'opt_state_bytes': _bytes(program.abstract_state['opt_state']),
    'state_live_bytes': live_bytes(state['train']),
    'compiled': compiled_memory(stats),
    'param_dtype': model_section.param_dtype,
    'lora': dict(lora_section) if lora_section else None,
  }

  def run():
    with parallel.axis_rules(layout.mesh, layout.rules):
      for _ in range(steps):
        state['train'], metrics = program.step(state['train'], sharded, None)
    return metrics['loss']

  return run, figures


def _mb(n: int) -> str:
  return f'{n / 2**20:,.1f}'


def run(config, workdir: str) -> dict:
  b = config.bench
  cfg = TransformerConfig.from_config(config.model)
  seq_len, batch_size, steps = config.data.seq_len, config.train.batch_size, b.steps_per_round
  batch = benchmarking.synthetic_lm_batch(batch_size, seq_len, cfg.vocab_size)
  sides, figures = {}, {}
  for name, (model_section, lora_section) in side_configs(config).items():
    sides[name], figures[name] = build_side(config, model_section, lora_section, batch, steps)
  times = benchmarking.interleaved(sides, rounds=b.rounds, warmup=b.warmup)
  tokens = steps * batch_size * seq_len
  results = {
    'device': jax.devices()[0].device_kind,
    'num_devices': len(jax.devices()),
    'threads': benchmarking.thread_counts(),
    'command': benchmarking.command_line(),
    'model': config.model.to_dict(),
    'lora': config.lora.to_dict(),
    'seq_len': seq_len,
    'batch_size': batch_size,
    'tokens_per_round': tokens,
    'sides': {},
  }
  for name in sides:
    t = times[name]
    results['sides'][name] = {
      **figures[name],
      **t.summary(),
      'tokens_per_s': tokens / t.median,
      'speed_vs_full': benchmarking.ratio(times[FULL], t).summary(),
    }
  full = results['sides'][FULL]
  what = (
    f'LoRA vs full fine-tuning step, d_model {cfg.d_model}, {cfg.num_layers} layers, vocab '
    f'{cfg.vocab_size}, seq {seq_len}, batch {batch_size}, compute {cfg.dtype}, AdamW, LoRA rank '
    f'{config.lora.rank} on {", ".join(config.lora.targets)}, {steps} steps per round on '
    f'{results["device"]} x{results["num_devices"]}'
  )
  table = benchmarking.header(what, rounds=b.rounds, warmup=b.warmup)
  table += (
    '| side | base dtype | trainable params | trainable % | optimizer state MiB | '
    'train state (live) MiB | step footprint MiB (compiled) | of it temporaries MiB | tokens/s (median) | '
    'min-max | speed vs full |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
  )
  for name, side in results['sides'].items():
    compiled = side['compiled']
    speed = benchmarking.ratio(times[FULL], times[name])
    table += (
      f'| {name} | {side["param_dtype"]} | {side["trainable_params"]:,} | '
      f'{100 * side["trainable_params"] / full["params"]:.2f} | {_mb(side["opt_state_bytes"])} | '
      f'{_mb(side["state_live_bytes"])} | {_mb(compiled.get("footprint", 0))} | '
      f'{_mb(compiled.get("temp", 0))} | {times[name].rate_cells(tokens)} | {speed.text()} |\n'
    )
  table += (
    f'\n{full["params"]:,} parameters. The memory columns are deterministic: optimizer state and '
    'live train state (params + optimizer state, the buffers kept between steps) from the '
    "buffers; the step footprint from XLA's compiled memory analysis of the step: arguments + "
    'outputs - donated + temporaries. speed vs full: full step time / side step time, median '
    '(min-max) of the per-round ratios.\n'
  )
  write_results(workdir, results, table)
  print(table)
  return results
