"""Does Top-P MoE cost what it activates? The MoE FFN fwd+bwd, side by side in one process.

For each case of `bench.cases` (E experts of width f, optional shared experts) the router is scaled
so that uncapped Top-P (p = bench.p) selects about `target_mean_k` experts per token, and these
are timed as jit(grad) of sum(y * cotangent) w.r.t. (x, router_w, w1, w3, w2[, shared]):
- Top-P with k_max = 2, 4, ceil(max selected) and E (uncapped), dispatch 'auto';
- the uncapped layer with each of `bench.dispatches` (e.g. 'dropless', 'dense' = all experts);
- the original Dynamic_MoE layer's algorithm re-implemented in JAX (`original_loop`: a loop over
  experts, each gathering its tokens, running its SwiGLU and index-adding the weighted output);
- a dense SwiGLU whose width (mean k + shared) * f gives the same active FLOPs.
Then a p sweep of the uncapped 'auto' layer: time and time per selected (token, expert) pair vs
the mean k (cost_vs_mean_k.png). Timings are interleaved (one call of each variant per round,
median over rounds) so machine load hits every variant alike; on CPU the clock is the process CPU
time (all threads), steadier than wall time on a shared machine; on GPU/TPU wall time.
Writes results.json, results.md and cost_vs_mean_k.png into the workdir.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from kuaijax import routing as routing_lib
from kuaijax.models import moe
from pallas_kernels.common import markdown_table, write_report

DENSE_EQUIVALENT = 'dense SwiGLU, same active FLOPs'
ORIGINAL = 'original Dynamic_MoE loop (JAX)'


def top_p_assignments(probs: np.ndarray, p: float):
  """Per expert, the (token, slot) pairs that select it: the original code's `torch.where`.

  Sorted descending, an expert is kept while the inclusive cumsum minus itself is <= p (the
  original's `cumsum > p` mask with the crossing expert re-admitted: the same set).
  """
  order = np.argsort(-probs, axis=-1, kind='stable')
  sorted_p = np.take_along_axis(probs, order, axis=-1)
  keep = np.cumsum(sorted_p, axis=-1) - sorted_p <= p
  tokens, slots = [], []
  for e in range(probs.shape[1]):
    t, s = np.nonzero(keep & (order == e))
    tokens.append(t.astype(np.int32))
    slots.append(s.astype(np.int32))
  return tokens, slots


def original_loop(x, router_w, w1, w3, w2, *shared, p, tokens, slots):
  """The original PyTorch layer (SwitchMLP) in JAX: loop over experts with their own token lists.

  Index lists come from `top_p_assignments` on the host (the original finds them on device with
  a host sync per expert; here they are constants of the compiled program, which favours it).
  """
  logits = x.astype(jnp.float32) @ router_w.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_p, _ = jax.lax.top_k(probs, probs.shape[1])
  routing_weights = jnp.where(jnp.cumsum(sorted_p, axis=-1) - sorted_p <= p, sorted_p, 0.0)
  y = jnp.zeros(x.shape, jnp.float32)
  for e, (idx, top) in enumerate(zip(tokens, slots)):
    out = moe.swiglu(x[idx], w1[e], w3[e], w2[e]) * routing_weights[idx, top, None]
    y = y.at[idx].add(out.astype(jnp.float32))
  y = y.astype(x.dtype)
  return y + moe.swiglu(x, *shared) if shared else y


def calibrate_router_scale(probs_of, *, p: float, target: float) -> float:
  """Scale s of the router whose uncapped Top-P mean experts per token is closest to `target`."""

  @jax.jit
  def mean_k(scale):
    weights, _ = routing_lib.top_p(probs_of(scale), p=p)
    return jnp.mean(jnp.sum(weights > 0, axis=-1))

  lo, hi = 0.0, 64.0  # mean k falls as the logits sharpen
  for _ in range(20):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if float(mean_k(mid)) > target else (lo, mid)
  return 0.5 * (lo + hi)


def _clock(kind: str):
  return time.process_time if kind == 'cpu' else time.perf_counter


def interleaved_times(fns: dict, args: dict, rounds: int, clock: str) -> dict:
  """Median seconds per call of each fn, one call of each per round (compiled + warmed first)."""
  now = _clock(clock)
  for name, fn in fns.items():
    logging.info('bench_moe: compiling %s', name)
    jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = now()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(now() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _grad_fn(fn, cotangent, num_args):
  def loss(*params):
    return jnp.sum((fn(*params) * cotangent).astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=tuple(range(num_args))))


def bench_case(name, case, b, dtype, clock):
  """The k_max / strategy / baseline table of one case and its p sweep."""
  tokens, d = b.tokens, b.d_model
  e, f, ns = case['num_experts'], case['d_ff'], case['num_shared_experts']
  keys = jax.random.split(jax.random.key(b.seed), 9)
  x = jax.random.normal(keys[0], (tokens, d), dtype)
  router_dir = jax.random.normal(keys[1], (d, e), jnp.float32) / np.sqrt(d)
  w1 = (jax.random.normal(keys[2], (e, d, f)) / np.sqrt(d)).astype(dtype)
  w3 = (jax.random.normal(keys[3], (e, d, f)) / np.sqrt(d)).astype(dtype)
  w2 = (jax.random.normal(keys[4], (e, f, d)) / np.sqrt(f)).astype(dtype)
  shared = ()
  if ns:
    fs = ns * f
    shared = (
      (jax.random.normal(keys[5], (d, fs)) / np.sqrt(d)).astype(dtype),
      (jax.random.normal(keys[6], (d, fs)) / np.sqrt(d)).astype(dtype),
      (jax.random.normal(keys[7], (fs, d)) / np.sqrt(fs)).astype(dtype),
    )
  cotangent = jax.random.normal(keys[8], (tokens, d), dtype)
  logits_dir = x.astype(jnp.float32) @ router_dir
  scale = calibrate_router_scale(
    lambda s: jax.nn.softmax(s * logits_dir, axis=-1), p=b.p, target=case['target_mean_k']
  )
  router_w = scale * router_dir
  params = (x, router_w, w1, w3, w2, *shared)

  def layer(**options):
    options = {'p': b.p, **options}
    cfg = moe.MoEConfig(
      num_experts=e, num_shared_experts=ns, gmm_implementation=b.gmm_implementation, **options
    )
    return functools.partial(_apply, cfg=cfg), cfg

  def routing_stats(cfg):
    return jax.jit(lambda *a: moe.moe_ffn(*a[:5], cfg)[1])(*params)

  aux = routing_stats(layer()[1])
  mean_k, max_k = float(aux['mean_k']), int(aux['max_k'])
  fns, args, info = {}, {}, {}
  for k_max in sorted({2, 4, max_k, e}):
    label = f'k_max={k_max}' + (' (uncapped)' if k_max == e else '')
    label += ' = ceil(max selected)' if k_max == max_k else ''
    fn, cfg = layer(k_max=0 if k_max == e else k_max)
    fns[label], args[label] = _grad_fn(fn, cotangent, len(params)), params
    a = aux if k_max == e else routing_stats(cfg)
    info[label] = dict(mean_k=float(a['mean_k']), strategy=cfg.strategy, k_max=k_max)
  uncapped_label = next(k for k in info if 'uncapped' in k)
  max_label = next(k for k in info if 'max selected' in k)
  for dispatch in b.dispatches.split(','):
    label = f'uncapped, dispatch={dispatch}'
    fn, cfg = layer(dispatch=dispatch)
    fns[label], args[label] = _grad_fn(fn, cotangent, len(params)), params
    info[label] = dict(mean_k=mean_k, strategy=cfg.strategy, k_max=e)
  probs = np.asarray(jax.nn.softmax(x.astype(jnp.float32) @ router_w, axis=-1))
  tok_lists, slot_lists = top_p_assignments(probs, b.p)
  loop = functools.partial(original_loop, p=b.p, tokens=tok_lists, slots=slot_lists)
  fns[ORIGINAL], args[ORIGINAL] = _grad_fn(loop, cotangent, len(params)), params
  info[ORIGINAL] = dict(mean_k=mean_k, strategy='loop over experts', k_max=e)
  width = max(1, round((mean_k + ns) * f))
  dense_w = (
    (jax.random.normal(keys[5], (d, width)) / np.sqrt(d)).astype(dtype),
    (jax.random.normal(keys[6], (d, width)) / np.sqrt(d)).astype(dtype),
    (jax.random.normal(keys[7], (width, d)) / np.sqrt(width)).astype(dtype),
  )
  fns[DENSE_EQUIVALENT] = _grad_fn(moe.swiglu, cotangent, 4)
  args[DENSE_EQUIVALENT] = (x, *dense_w)
  info[DENSE_EQUIVALENT] = dict(mean_k=mean_k, strategy=f'width {width}', k_max=0)
  logging.info(
    'bench_moe: %s, mean k %.3f, max k %d: timing %d variants', name, mean_k, max_k, len(fns)
  )
  times = interleaved_times(fns, args, b.rounds, clock)
  base = times[DENSE_EQUIVALENT]
  rows = []
  for label, t in times.items():
    pairs = tokens * info[label]['mean_k']
    info[label].update(seconds=t, vs_dense=t / base)
    rows.append(
      {
        'case': name,
        'variant': label,
        'dispatch': info[label]['strategy'],
        'mean k': info[label]['mean_k'],
        'fwd+bwd ms': 1e3 * t,
        'x dense equal FLOPs': t / base,
        'x original loop': t / times[ORIGINAL],
        'us per selected pair': 1e6 * t / pairs,
      }
    )
  summary = dict(
    mean_k=mean_k,
    max_k=max_k,
    router_scale=scale,
    dense_width=width,
    uncapped_vs_kmax_ceil_max=times[uncapped_label] / times[max_label],
    uncapped_vs_original=times[uncapped_label] / times[ORIGINAL],
    uncapped_vs_dense=times[uncapped_label] / base,
    variants=info,
  )

  sweep = []
  sweep_fns, sweep_args = {}, {}
  for p in b.sweep_p:
    fn, cfg = layer(p=p)
    sweep_fns[p], sweep_args[p] = _grad_fn(fn, cotangent, len(params)), params
    a = routing_stats(cfg)
    sweep.append(dict(p=p, mean_k=float(a['mean_k']), max_k=int(a['max_k'])))
  sweep_times = interleaved_times(sweep_fns, sweep_args, b.rounds, clock)
  for row in sweep:
    t = sweep_times[row['p']]
    row.update(seconds=t, us_per_pair=1e6 * t / (tokens * row['mean_k']))
  summary['p_sweep'] = sweep
  return rows, summary


def _apply(x, router_w, w1, w3, w2, *shared, cfg):
  return moe.moe_ffn(x, router_w, w1, w3, w2, cfg, shared=shared or None)[0]


def plot_cost(summaries: dict, path: str) -> None:
  """Time and time per selected pair vs mean k over the p sweep, one panel per case."""
  fig = Figure(figsize=(6 * len(summaries), 4), layout='constrained')
  axes = fig.subplots(1, len(summaries), squeeze=False)[0]
  for ax, (name, s) in zip(axes, summaries.items()):
    ks = [r['mean_k'] for r in s['p_sweep']]
    ax.plot(ks, [1e3 * r['seconds'] for r in s['p_sweep']], marker='o', label='fwd+bwd ms')
    for r in s['p_sweep']:
      ax.annotate(f'p={r["p"]}', (r['mean_k'], 1e3 * r['seconds']), fontsize=7)
    ax.set(title=f'{name}: cost vs experts selected', xlabel='mean k', ylabel='ms')
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    twin = ax.twinx()
    twin.plot(ks, [r['us_per_pair'] for r in s['p_sweep']], marker='s', color='C1')
    twin.set_ylabel('us per selected pair', color='C1')
    twin.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
  fig.savefig(path, dpi=100, bbox_inches='tight')


def run(config, workdir: str) -> dict:
  b = config.bench
  dtype = jnp.dtype(b.dtype)
  backend = jax.default_backend()
  clock = b.clock if b.clock != 'auto' else ('cpu' if backend == 'cpu' else 'wall')
  payload = {
    'device': jax.devices()[0].device_kind,
    'backend': backend,
    'clock': clock,
    'tokens': b.tokens,
    'd_model': b.d_model,
    'p': b.p,
    'dtype': b.dtype,
    'rounds': b.rounds,
    'cases': {},
  }
  rows = []
  for name in b.run_cases.split(','):
    case_rows, summary = bench_case(name, b.cases[name].to_dict(), b, dtype, clock)
    rows += case_rows
    payload['cases'][name] = summary
  columns = ['case', 'variant', 'dispatch', 'mean k', 'fwd+bwd ms', 'x dense equal FLOPs']
  columns += ['x original loop', 'us per selected pair']
  sweep_rows = [
    {'case': n, **{k: v for k, v in r.items() if k != 'seconds'}, 'fwd+bwd ms': 1e3 * r['seconds']}
    for n, s in payload['cases'].items()
    for r in s['p_sweep']
  ]
  header = (
    f'MoE FFN fwd+bwd on {payload["device"]} ({backend}, {clock} clock): T={b.tokens}, '
    f'd={b.d_model}, {b.dtype}, Top-P p={b.p}; median of {b.rounds} interleaved rounds.\n\n'
  )
  table = header + markdown_table(rows, columns)
  table += '\nCost vs mean k (uncapped, dispatch auto, p sweep):\n\n'
  table += markdown_table(sweep_rows, ['case', 'p', 'mean_k', 'max_k', 'fwd+bwd ms', 'us_per_pair'])
  if jax.process_index() == 0:  # no trainer imports: runs where grain / tfds are not installed
    write_report(workdir, 'results', payload, table)
    plot_cost(payload['cases'], os.path.join(workdir, 'cost_vs_mean_k.png'))
  print(table)
  return payload
