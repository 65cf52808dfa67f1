"""Hugging Face interop benchmark: import memory/time and greedy decoding speed, side by side.

1. Import: a random Llama-shaped float32 checkpoint (`bench.import_model`, ~1 GB at full size) is
   written with kuaijax's safetensors writer; in fresh child processes (so resident memory starts
   clean, after a warm-up read puts the files in the page cache) we measure
   (a) `safetensors.safe_open(..., 'np')` reading every tensor (the floor: just reading the files),
   (b) `kuaijax.hf.model_io.load_model` building the kuaijax model on the CPU device.
   Reported: wall time and peak resident-memory growth (VmHWM - VmRSS before the load), and the
   ratios to the checkpoint size / the safetensors read time.
2. Decoding: a smaller random Llama (`bench.decode_model`) built with transformers, saved, imported;
   greedy decoding of `bench.new_tokens` tokens at batch 1 and 8, kuaijax `sampling.generate` vs
   transformers `generate` (both warmed up once, then timed), tokens/s and the ratio.
Writes results.json, results.md and bench_hf.png into the workdir.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from kuaijax.results import write_results


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


def _measure(kind: str, folder: str, queue) -> None:
  """Child process: wall time and peak RSS growth of one way of loading the folder."""
  from kuaijax.hf import model_io

  jax.devices()
  if kind == 'safetensors':
    from safetensors import safe_open

  base = _rss_kb('VmRSS')
  start = time.perf_counter()
  if kind == 'safetensors':
    total = 0
    with safe_open(os.path.join(folder, 'model.safetensors'), 'np') as f:
      arrays = [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118
      total = sum(a.nbytes for a in arrays)
  else:
    model = model_io.load_model(folder)
    leaves = jax.tree.leaves(model)
    jax.block_until_ready(leaves)
    total = sum(x.nbytes for x in leaves if hasattr(x, 'nbytes'))
  seconds = time.perf_counter() - start
  queue.put(dict(seconds=seconds, rss_growth_bytes=(_rss_kb('VmHWM') - base) * 1024, bytes=total))


def measure_import(folder: str, repeats: int) -> dict:
  ctx = multiprocessing.get_context('spawn')
  with open(os.path.join(folder, 'model.safetensors'), 'rb') as f:  # page-cache warm-up
    while f.read(1 << 26):
      pass
  out = {}
  for kind in ('safetensors', 'kuaijax'):
    runs = []
    for _ in range(repeats):
      queue = ctx.Queue()
      proc = ctx.Process(target=_measure, args=(kind, folder, queue))
      proc.start()
      runs.append(queue.get())
      proc.join()
    out[kind] = dict(
      seconds=min(r['seconds'] for r in runs),
      rss_growth_bytes=min(r['rss_growth_bytes'] for r in runs),
      bytes=runs[0]['bytes'],
    )
  return out


def measure_decode(folder_root: str, model: dict, batches, new_tokens: int, prompt_len: int):
  """Greedy tokens/s of kuaijax and transformers on the same random Llama."""
  import torch
  import transformers

  from kuaijax import sampling
  from kuaijax.hf import model_io, reference

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

    def run_kuaijax(prompts=prompts, batch=batch):
      out = sampling.generate(
        ours, prompts, [prompt_len] * batch, max_new_tokens=new_tokens, greedy=True
      )
      return np.asarray(out.tokens)

    def run_hf(prompts=prompts):
      with torch.inference_mode():
        return reference.greedy(hf, prompts, new_tokens)

    times = {}
    for name, fn in (('kuaijax', run_kuaijax), ('transformers', run_hf)):
      fn()  # warm-up (compilation for kuaijax)
      start = time.perf_counter()
      tokens = fn()
      times[name] = time.perf_counter() - start
      times[name + '_tokens'] = tokens
    same = float(np.mean(times['kuaijax_tokens'] == times['transformers_tokens']))
    rows.append(
      dict(
        batch=batch,
        kuaijax_tokens_per_s=batch * new_tokens / times['kuaijax'],
        transformers_tokens_per_s=batch * new_tokens / times['transformers'],
        speedup=times['transformers'] / times['kuaijax'],
        same_tokens_fraction=same,
      )
    )
  return rows, torch.get_num_threads()


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  b = config.bench
  folder = os.path.join(workdir, 'import_llama')
  size = write_random_llama(folder, b.import_model.to_dict())
  imp = measure_import(folder, int(b.repeats))
  results = dict(
    checkpoint_bytes=size,
    import_=imp,
    rss_growth_over_checkpoint=imp['kuaijax']['rss_growth_bytes'] / size,
    import_time_over_safetensors=imp['kuaijax']['seconds'] / imp['safetensors']['seconds'],
    cpu_count=os.cpu_count(),
  )
  lines = [
    '## Hugging Face import and decoding benchmark',
    '',
    f'Import of a random Llama checkpoint of {size / 2**30:.2f} GiB (float32), best of '
    f'{b.repeats} fresh processes, files in the page cache:',
    '',
    '| loader | wall s | peak RSS growth (GiB) | RSS growth / checkpoint |',
    '|---|---:|---:|---:|',
  ]
  for kind in ('safetensors', 'kuaijax'):
    r = imp[kind]
    lines.append(
      f'| {kind} | {r["seconds"]:.2f} | {r["rss_growth_bytes"] / 2**30:.2f} | '
      f'{r["rss_growth_bytes"] / size:.2f} |'
    )
  lines.append(
    f'\nkuaijax import time / safetensors read time: {results["import_time_over_safetensors"]:.2f}'
  )
  if b.decode:
    rows, threads = measure_decode(
      workdir, b.decode_model.to_dict(), tuple(b.batches), int(b.new_tokens), int(b.prompt_len)
    )
    results['decode'] = rows
    results['torch_threads'] = threads
    lines += [
      '',
      f'Greedy decoding, {b.new_tokens} new tokens after {b.prompt_len} prompt tokens, CPU '
      f'({threads} torch threads):',
      '',
      '| batch | kuaijax tok/s | transformers tok/s | kuaijax speed-up | same tokens |',
      '|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
      lines.append(
        f'| {r["batch"]} | {r["kuaijax_tokens_per_s"]:.1f} | '
        f'{r["transformers_tokens_per_s"]:.1f} | {r["speedup"]:.2f}x | '
        f'{r["same_tokens_fraction"]:.2f} |'
      )
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  names = ['import time / read', 'import RSS / size']
  values = [results['import_time_over_safetensors'], results['rss_growth_over_checkpoint']]
  for r in results.get('decode', []):
    names.append(f'decode speed-up b={r["batch"]}')
    values.append(r['speedup'])
  ax.bar(range(len(values)), values)
  ax.set_xticks(range(len(values)), names, rotation=20, ha='right')
  ax.axhline(1.0, color='gray', lw=0.8)
  ax.set(title='kuaijax HF interop (ratios)', ylabel='ratio')
  fig.savefig(os.path.join(workdir, 'bench_hf.png'), dpi=100, bbox_inches='tight')
  write_results(workdir, results, '\n'.join(lines) + '\n')
  return results
