"""What does Top-P MoE cost in wall clock? The MoE FFN fwd+bwd against the original and a dense layer.

For each case of `bench.cases` (E experts of width f, optional shared experts) the router is scaled
so that uncapped Top-P (p = bench.p) selects about `target_mean_k` experts per token. Sides, all
jit(grad) (or torch autograd) of sum(y * cotangent) w.r.t. every input, timed through
`kuaijax.benchmarking.interleaved` (wall clock, warm-up excluded, rounds interleaved):
- the layer, uncapped, dispatch 'auto', and with each of `bench.dispatches`; Top-P capped at
  k_max = ceil(max selected);
- `original (PyTorch loop)`: the paper's algorithm as the released Dynamic_MoE layer runs it
  (softmax router, sort, cumsum mask, a Python loop over experts, each finding its tokens with
  `torch.where`, running its SwiGLU and index-adding the weighted output), same weights, torch
  autograd, torch given XLA's thread count; absent when torch is not installed;
- `dense SwiGLU, same active FLOPs`: width (mean k + shared) * f.
Then where the uncapped layer's time goes (router, counting sort, experts forward, experts
backward, the matmul work alone) and a p sweep: time per selected (token, expert) pair vs mean k
(cost_vs_mean_k.png). Writes results.json, results.md and cost_vs_mean_k.png.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from matplotlib.figure import Figure

from kuaijax import benchmarking
from kuaijax import routing as routing_lib
from kuaijax.models import dispatch, moe
from pallas_kernels.common import markdown_table, write_report

DENSE_EQUIVALENT = 'dense SwiGLU, same active FLOPs'
ORIGINAL = 'original (PyTorch loop)'
UNCAPPED = 'Top-P uncapped, dispatch=auto'


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


def torch_loop_layer(p: float):
  """The original layer's algorithm in PyTorch: fn(x, router_w, w1, w3, w2, *shared) -> y."""
  import torch  # noqa: PLC0415  (reference dependency)

  def layer(x, router_w, w1, w3, w2, *shared):
    probs = torch.softmax(x @ router_w, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    keep = torch.cumsum(sorted_p, dim=-1) - sorted_p <= p  # exclusive mass <= p
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
      tokens, slots = torch.where(keep & (order == e))
      xs = x[tokens]
      out = (torch.nn.functional.silu(xs @ w1[e]) * (xs @ w3[e])) @ w2[e]
      y = y.index_add(0, tokens, out * sorted_p[tokens, slots, None])
    if shared:
      s1, s3, s2 = shared
      y = y + (torch.nn.functional.silu(x @ s1) * (x @ s3)) @ s2
    return y

  return layer


def torch_side(p: float, params, cotangent):
  """A zero-argument torch fwd+bwd of the original layer on copies of `params` (None: no torch)."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None
  benchmarking.match_torch_threads()
  leaves = [torch.tensor(np.asarray(a, np.float32), requires_grad=True) for a in params]
  ct = torch.tensor(np.asarray(cotangent, np.float32))
  layer = torch_loop_layer(p)

  def run():
    for leaf in leaves:
      leaf.grad = None
    (layer(*leaves) * ct).sum().backward()
    return [leaf.grad for leaf in leaves]

  return run


def _grad_fn(fn, cotangent, num_args):
  def loss(*params):
    return jnp.sum((fn(*params) * cotangent).astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=tuple(range(num_args))))


def _apply(x, router_w, w1, w3, w2, *shared, cfg):
  return moe.moe_ffn(x, router_w, w1, w3, w2, cfg, shared=shared or None)[0]


def _swiglu_weights(keys, d, width, dtype):
  return (
    (jax.random.normal(keys[0], (d, width)) / np.sqrt(d)).astype(dtype),
    (jax.random.normal(keys[1], (d, width)) / np.sqrt(d)).astype(dtype),
    (jax.random.normal(keys[2], (width, d)) / np.sqrt(width)).astype(dtype),
  )


def breakdown_sides(x, router_w, w1, w3, w2, cotangent, cfg):
  """Zero-argument pieces of the uncapped layer: where its time goes."""
  tokens, d = x.shape
  _, _, weights, ids, _ = moe.route(x, router_w, cfg)
  sizes, positions = dispatch.group_positions(ids, cfg.num_experts)
  pairs = int(jnp.sum(sizes))
  saved = math.ceil(tokens * cfg.saved_rows_per_token)

  def route_loss(x, router_w):
    return jnp.sum(moe.route(x, router_w, cfg)[2])

  def experts(x, w, a, b, c):
    return dispatch.tiled_ffn(x, w, positions, sizes, a, b, c, saved)

  route = jax.jit(jax.grad(route_loss, argnums=(0, 1)))
  sort = jax.jit(lambda ids: dispatch.group_positions(ids, cfg.num_experts))
  experts_fwd = jax.jit(experts)
  experts_grad = _grad_fn(experts, cotangent, 5)
  # The experts' matmuls alone: one SwiGLU of width f over all selected rows (fwd + bwd), plus
  # the input projections the backward recomputes (rows past the saved budget).
  rows = jax.random.normal(jax.random.key(7), (pairs, d), x.dtype)
  dense_rows = _grad_fn(moe.swiglu, jax.random.normal(jax.random.key(8), (pairs, d), x.dtype), 4)
  sides = {
    'router + Top-P selection (fwd+bwd)': lambda: route(x, router_w),
    'counting sort by expert': lambda: sort(ids),
    'experts forward (tiled)': lambda: experts_fwd(x, weights, w1, w3, w2),
    'experts fwd+bwd (tiled)': lambda: experts_grad(x, weights, w1, w3, w2),
    f'matmuls alone: SwiGLU fwd+bwd on {pairs} rows': lambda: dense_rows(rows, w1[0], w3[0], w2[0]),
  }
  if pairs > saved:
    w13, extra = jnp.concatenate([w1[0], w3[0]], axis=1), rows[saved:]
    recompute = jax.jit(lambda r, w: r @ w)
    sides[f'matmuls alone: {pairs - saved} recomputed input projections'] = lambda: recompute(
      extra, w13
    )
  return sides, pairs


def bench_case(name, case, b, dtype):
  """The sides table, the time breakdown and the p sweep of one case."""
  tokens, d = b.tokens, b.d_model
  e, f, ns = case['num_experts'], case['d_ff'], case['num_shared_experts']
  keys = jax.random.split(jax.random.key(b.seed), 12)
  x = jax.random.normal(keys[0], (tokens, d), dtype)
  router_dir = jax.random.normal(keys[1], (d, e), jnp.float32) / np.sqrt(d)
  w1 = (jax.random.normal(keys[2], (e, d, f)) / np.sqrt(d)).astype(dtype)
  w3 = (jax.random.normal(keys[3], (e, d, f)) / np.sqrt(d)).astype(dtype)
  w2 = (jax.random.normal(keys[4], (e, f, d)) / np.sqrt(f)).astype(dtype)
  shared = _swiglu_weights(keys[5:8], d, ns * f, dtype) if ns else ()
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
    return _grad_fn(functools.partial(_apply, cfg=cfg), cotangent, len(params)), cfg

  def routing_stats(cfg):
    return jax.jit(lambda *a: moe.moe_ffn(*a[:5], cfg)[1])(*params)

  aux = routing_stats(layer()[1])
  mean_k, max_k = float(aux['mean_k']), int(aux['max_k'])
  fns, info = {}, {}
  fn, cfg = layer()
  fns[UNCAPPED], info[UNCAPPED] = fn, dict(mean_k=mean_k, dispatch=cfg.strategy)
  if max_k < e:
    label = f'Top-P k_max={max_k} = ceil(max selected)'
    fn, cfg = layer(k_max=max_k)
    fns[label] = fn
    info[label] = dict(mean_k=float(routing_stats(cfg)['mean_k']), dispatch=cfg.strategy)
  for strategy in filter(None, b.dispatches.split(',')):
    label = f'Top-P uncapped, dispatch={strategy}'
    fns[label], _ = layer(dispatch=strategy)
    info[label] = dict(mean_k=mean_k, dispatch=strategy)
  sides = {label: functools.partial(fn, *params) for label, fn in fns.items()}
  original = torch_side(b.p, params, cotangent) if b.torch else None
  if original is not None:
    sides[ORIGINAL] = original
    info[ORIGINAL] = dict(mean_k=mean_k, dispatch='loop over experts')
  width = max(1, round((mean_k + ns) * f))
  dense_w = _swiglu_weights(keys[9:12], d, width, dtype)
  dense = _grad_fn(moe.swiglu, cotangent, 4)
  sides[DENSE_EQUIVALENT] = lambda: dense(x, *dense_w)
  info[DENSE_EQUIVALENT] = dict(mean_k=mean_k, dispatch=f'width {width}')
  logging.info('bench_moe: %s, mean k %.3f, max k %d: %d sides', name, mean_k, max_k, len(sides))
  times = benchmarking.interleaved(sides, rounds=b.rounds, warmup=b.warmup)
  rows = []
  for label, t in times.items():
    row = {
      'case': name,
      'side': label,
      'dispatch': info[label]['dispatch'],
      'mean k': info[label]['mean_k'],
      'fwd+bwd ms': 1e3 * t.median,
      'min-max ms': f'{1e3 * t.low:.0f}-{1e3 * t.high:.0f}',
      'x dense equal FLOPs': benchmarking.ratio(t, times[DENSE_EQUIVALENT]).text(),
    }
    if ORIGINAL in times:
      row['x original'] = benchmarking.ratio(t, times[ORIGINAL]).text()
    rows.append(row)
    info[label].update(t.summary())
  summary = dict(
    mean_k=mean_k,
    max_k=max_k,
    router_scale=scale,
    dense_width=width,
    uncapped_vs_dense=benchmarking.ratio(times[UNCAPPED], times[DENSE_EQUIVALENT]).summary(),
    sides=info,
  )
  if ORIGINAL in times:
    summary['uncapped_vs_original'] = benchmarking.ratio(times[UNCAPPED], times[ORIGINAL]).summary()

  parts, pairs = breakdown_sides(x, router_w, w1, w3, w2, cotangent, layer()[1])
  if ns:
    shared_fn = _grad_fn(moe.swiglu, cotangent, 4)
    parts[f'shared experts fwd+bwd (width {ns * f})'] = lambda: shared_fn(x, *shared)
  part_times = benchmarking.interleaved(parts, rounds=b.rounds, warmup=b.warmup)
  summary['breakdown'] = {label: t.summary() for label, t in part_times.items()}
  summary['selected_pairs'] = pairs
  breakdown = [
    {
      'case': name,
      'piece': label,
      'ms': 1e3 * t.median,
      'share of the layer': t.median / times[UNCAPPED].median,
    }
    for label, t in part_times.items()
  ]

  sweep = []
  sweep_sides = {}
  for p in b.sweep_p:
    fn, cfg = layer(p=p)
    sweep_sides[p] = functools.partial(fn, *params)
    a = routing_stats(cfg)
    sweep.append(dict(p=p, mean_k=float(a['mean_k']), max_k=int(a['max_k'])))
  sweep_times = benchmarking.interleaved(sweep_sides, rounds=b.rounds, warmup=b.warmup)
  for row in sweep:
    t = sweep_times[row['p']].median
    row.update(seconds=t, us_per_pair=1e6 * t / (tokens * row['mean_k']))
  summary['p_sweep'] = sweep
  return rows, breakdown, summary


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
  payload = {
    'device': jax.devices()[0].device_kind,
    'command': benchmarking.command_line(),
    'tokens': b.tokens,
    'd_model': b.d_model,
    'p': b.p,
    'dtype': b.dtype,
    'rounds': b.rounds,
    'cases': {},
  }
  rows, breakdown = [], []
  for name in b.run_cases.split(','):
    case_rows, case_breakdown, summary = bench_case(name, b.cases[name].to_dict(), b, dtype)
    rows += case_rows
    breakdown += case_breakdown
    payload['cases'][name] = summary
  payload['threads'] = benchmarking.thread_counts()  # after the torch side set its threads
  columns = ['case', 'side', 'dispatch', 'mean k', 'fwd+bwd ms', 'min-max ms']
  columns += ['x dense equal FLOPs'] + (['x original'] if 'x original' in rows[0] else [])
  sweep_rows = [
    {'case': n, **{k: v for k, v in r.items() if k != 'seconds'}, 'fwd+bwd ms': 1e3 * r['seconds']}
    for n, s in payload['cases'].items()
    for r in s['p_sweep']
  ]
  what = (
    f'MoE FFN fwd+bwd on {payload["device"]}: T={b.tokens}, d={b.d_model}, {b.dtype}, Top-P '
    f'p={b.p}; ratios are medians (min-max) of per-round ratios'
  )
  table = benchmarking.header(what, rounds=b.rounds, warmup=b.warmup)
  table += markdown_table(rows, columns)
  table += '\nWhere the uncapped layer spends its time (each piece timed alone, interleaved):\n\n'
  table += markdown_table(breakdown, ['case', 'piece', 'ms', 'share of the layer'])
  table += '\nCost vs mean k (uncapped, dispatch auto, p sweep):\n\n'
  table += markdown_table(sweep_rows, ['case', 'p', 'mean_k', 'max_k', 'fwd+bwd ms', 'us_per_pair'])
  if jax.process_index() == 0:  # no trainer imports: runs where grain / tfds are not installed
    write_report(workdir, 'results', payload, table)
    plot_cost(payload['cases'], os.path.join(workdir, 'cost_vs_mean_k.png'))
  print(table)
  return payload
