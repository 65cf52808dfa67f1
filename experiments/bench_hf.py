"""Hugging Face interop benchmark: import memory/time and greedy decoding speed, side by side.

Both parts go through `kuaijax.benchmarking` (wall clock, warm-up excluded, the two sides
interleaved over `bench.rounds` rounds, median and min-max, ratios as the median (min-max) of
per-round ratios; results.md starts with the command and the thread counts).
1. Import: a random Llama-shaped float32 checkpoint (`bench.import_model`, ~1 GB at full size) is
   written with kuaijax's safetensors writer and loaded `bench.warmup` times by each loader in this
   process (files and libraries in the page cache); then each round starts one fresh child process
   per loader, in turn (so resident memory starts clean), which times one load with the harness:
   (a) `safetensors.safe_open(..., 'np')` reading every tensor (the floor: just reading the files),
   (b) `kuaijax.hf.model_io.load_model` building the kuaijax model on the CPU device.
   Reported: wall time and peak resident-memory growth (VmHWM - VmRSS before the load), and the
   ratios to the checkpoint size / the safetensors read time.
2. Decoding: a smaller random Llama (`bench.decode_model`) built with transformers, saved, imported;
   greedy decoding of `bench.new_tokens` tokens at each batch size of `bench.batches`, kuaijax
   `sampling.generate` vs transformers `generate` (torch given XLA's thread count), interleaved
   after `bench.warmup` calls of each (compilation): tokens/s, the speed-up and the fraction of
   equal tokens (both greedy on the same weights).
Writes results.json, results.md and bench_hf.png into the workdir.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import jax
import numpy as np
from matplotlib.figure import Figure

from kuaijax import benchmarking
from kuaijax.results import write_results

LOADERS = ('safetensors', 'kuaijax')


def _rss_kb(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  return 0


def write_random_llama(folder: str, model: dict, seed: int = 0) -> int:
  """A random float32 Llama checkpoint (config.json + model.safetensors); returns its bytes."""
  from flax import nnx

  from kuaijax.hf import families, model_io
  from kuaijax.hf.safetensors_io import write_file
  from kuaijax.models.transformer import Transformer, TransformerConfig

  cfg = TransformerConfig(**model)
  state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)[1]
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
    lambda a: 0.02 * rng.standard_normal(a.shape, np.float32), nnx.to_pure_dict(state)
  )
  tensors = model_io.hf_tensors(params, 'llama')
  del params
  os.makedirs(folder, exist_ok=True)
  write_file(os.path.join(folder, 'model.safetensors'), tensors, {'format': 'pt'})
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(families.hf_config({**model, 'mlp_options': {}}, 'llama'), f, indent=2)
  return sum(t.nbytes for t in tensors.values())


def _loader(kind: str, folder: str):
  """A zero-argument load of the folder's weights returning the loaded arrays (imports done)."""
  if kind == 'safetensors':
    from safetensors import safe_open

    def load():
      with safe_open(os.path.join(folder, 'model.safetensors'), 'np') as f:
        return [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118

  else:
    from kuaijax.hf import model_io

    def load():
      return [x for x in jax.tree.leaves(model_io.load_model(folder)) if hasattr(x, 'nbytes')]

  return load


def _measure(kind: str, folder: str, queue) -> None:
  """Child process: wall time (the harness, one call) and peak RSS growth of one load."""
  jax.devices()
  load = _loader(kind, folder)
  loaded = []

  def side():
    loaded.append(load())
    return loaded[-1]

  base = _rss_kb('VmRSS')
  timing = benchmarking.interleaved({kind: side}, rounds=1, warmup=0)
  queue.put(
    dict(
      seconds=timing[kind].seconds[0],
      rss_growth_bytes=(_rss_kb('VmHWM') - base) * 1024,
      bytes=sum(a.nbytes for a in loaded[-1]),
    )
  )


def measure_import(folder: str, rounds: int, warmup: int) -> tuple[dict, benchmarking.Ratio]:
  """Per loader: the wall-clock timing summary, the RSS growth of each round (and its median) and
  the bytes loaded, one fresh child process per loader and round, the loaders in turn; and the
  per-round time ratio kuaijax / safetensors."""
  for _ in range(warmup):  # in this process: the files and libraries into the page cache
    for kind in LOADERS:
      jax.block_until_ready(_loader(kind, folder)())
  ctx = multiprocessing.get_context('spawn')
  runs = {kind: [] for kind in LOADERS}
  for _ in range(rounds):
    for kind in LOADERS:
      queue = ctx.Queue()
      proc = ctx.Process(target=_measure, args=(kind, folder, queue))
      proc.start()
      runs[kind].append(queue.get())
      proc.join()
  times = {kind: benchmarking.Timing(tuple(r['seconds'] for r in runs[kind])) for kind in LOADERS}
  out = {}
  for kind in LOADERS:
    rss = [r['rss_growth_bytes'] for r in runs[kind]]
    out[kind] = dict(
      **times[kind].summary(),
      rss_growth_bytes=float(np.median(rss)),
      rss_growth_rounds=rss,
      bytes=runs[kind][0]['bytes'],
    )
  return out, benchmarking.ratio(times['kuaijax'], times['safetensors'])


def measure_decode(
  folder_root: str,
  model: dict,
  batches,
  new_tokens: int,
  prompt_len: int,
  *,
  rounds: int = 5,
  warmup: int = 1,
):
  """Greedy tokens/s of kuaijax and transformers on the same random Llama, interleaved rounds.

  Returns (one row per batch size, the thread counts in force).
  """
  import torch
  import transformers

  from kuaijax import sampling
  from kuaijax.hf import model_io, reference

  benchmarking.match_torch_threads()
  config = transformers.LlamaConfig(
    vocab_size=model['vocab_size'],
    hidden_size=model['d_model'],
    intermediate_size=model['d_ff'],
    num_hidden_layers=model['num_layers'],
    num_attention_heads=model['num_heads'],
    num_key_value_heads=model['num_kv_heads'],
  )
  hf = transformers.AutoModelForCausalLM.from_config(config).eval()
  reference.randomize(hf, std=0.02)
  hf.generation_config.eos_token_id = None
  folder = os.path.join(folder_root, 'decode_llama')
  hf.save_pretrained(folder)
  ours = model_io.load_model(folder)
  rows = []
  for batch in batches:
    prompts = np.random.default_rng(batch).integers(3, model['vocab_size'], (batch, prompt_len))
    tokens = {}  # the last output of each side

    def run_kuaijax(prompts=prompts, batch=batch, tokens=tokens):
      out = sampling.generate(
        ours, prompts, [prompt_len] * batch, max_new_tokens=new_tokens, greedy=True
      )
      tokens['kuaijax'] = np.asarray(out.tokens)

    def run_hf(prompts=prompts, tokens=tokens):
      with torch.inference_mode():
        tokens['transformers'] = reference.greedy(hf, prompts, new_tokens)

    times = benchmarking.interleaved(
      {'kuaijax': run_kuaijax, 'transformers': run_hf}, rounds=rounds, warmup=warmup
    )
    generated = batch * new_tokens
    speedup = benchmarking.ratio(times['transformers'], times['kuaijax'])
    rows.append(
      dict(
        batch=batch,
        kuaijax=times['kuaijax'].summary(),
        transformers=times['transformers'].summary(),
        kuaijax_tokens_per_s=generated / times['kuaijax'].median,
        transformers_tokens_per_s=generated / times['transformers'].median,
        speedup=speedup.summary(),  # transformers time / kuaijax time, per round
        speedup_text=speedup.text(),
        same_tokens_fraction=float(np.mean(tokens['kuaijax'] == tokens['transformers'])),
      )
    )
  return rows, benchmarking.thread_counts()


def _rate(tokens: int, timing: dict) -> str:
  return (
    f'{tokens / timing["median_s"]:.1f} | {tokens / timing["max_s"]:.1f}-'
    f'{tokens / timing["min_s"]:.1f}'
  )


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  b = config.bench
  rounds, warmup = int(b.rounds), int(b.warmup)
  folder = os.path.join(workdir, 'import_llama')
  size = write_random_llama(folder, b.import_model.to_dict())
  imp, import_ratio = measure_import(folder, rounds, warmup)
  results = dict(
    command=benchmarking.command_line(),
    checkpoint_bytes=size,
    import_=imp,
    rss_growth_over_checkpoint=imp['kuaijax']['rss_growth_bytes'] / size,
    import_time_over_safetensors=import_ratio.summary(),
  )
  lines = [
    f'Import of a random Llama checkpoint of {size / 2**30:.2f} GiB (float32): one fresh process '
    f"per loader and round, after {warmup} untimed load(s) of each in the benchmark's own process "
    '(files and libraries in the page cache):',
    '',
    '| loader | wall s (median) | min-max | peak RSS growth (GiB, median) | RSS growth / checkpoint |',
    '|---|---:|---:|---:|---:|',
  ]
  for kind in LOADERS:
    r = imp[kind]
    lines.append(
      f'| {kind} | {r["median_s"]:.2f} | {r["min_s"]:.2f}-{r["max_s"]:.2f} | '
      f'{r["rss_growth_bytes"] / 2**30:.2f} | {r["rss_growth_bytes"] / size:.2f} |'
    )
  lines.append(f'\nkuaijax import time / safetensors read time, per round: {import_ratio.text()}')
  if b.decode:
    rows, _ = measure_decode(
      workdir,
      b.decode_model.to_dict(),
      tuple(b.batches),
      int(b.new_tokens),
      int(b.prompt_len),
      rounds=rounds,
      warmup=warmup,
    )
    results['decode'] = rows
    lines += [
      '',
      f'Greedy decoding, {b.new_tokens} new tokens after {b.prompt_len} prompt tokens, CPU:',
      '',
      '| batch | kuaijax tok/s (median) | min-max | transformers tok/s (median) | min-max | '
      'kuaijax speed-up, per round | same tokens |',
      '|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
      generated = r['batch'] * int(b.new_tokens)
      lines.append(
        f'| {r["batch"]} | {_rate(generated, r["kuaijax"])} | '
        f'{_rate(generated, r["transformers"])} | {r["speedup_text"]} | '
        f'{r["same_tokens_fraction"]:.2f} |'
      )
  results['threads'] = benchmarking.thread_counts()  # after the torch side set its threads
  what = 'Hugging Face import and greedy decoding'
  table = benchmarking.header(what, rounds=rounds, warmup=warmup) + '\n'.join(lines) + '\n'
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  ratios = {'import time / read': results['import_time_over_safetensors']}
  for r in results.get('decode', []):
    ratios[f'decode speed-up b={r["batch"]}'] = r['speedup']
  medians = [v['median'] for v in ratios.values()]
  spread = [[m - v['min'] for m, v in zip(medians, ratios.values())]]
  spread.append([v['max'] - m for m, v in zip(medians, ratios.values())])
  names = [*ratios, 'import RSS / size']
  ax.bar(range(len(names)), [*medians, results['rss_growth_over_checkpoint']])
  ax.errorbar(range(len(medians)), medians, yerr=spread, fmt='none', color='k', capsize=3)
  ax.set_xticks(range(len(names)), names, rotation=20, ha='right')
  ax.axhline(1.0, color='gray', lw=0.8)
  ax.set(title='kuaijax HF interop (ratios: median, min-max over rounds)', ylabel='ratio')
  fig.savefig(os.path.join(workdir, 'bench_hf.png'), dpi=100, bbox_inches='tight')
  write_results(workdir, results, table)
  print(table)
  return results
