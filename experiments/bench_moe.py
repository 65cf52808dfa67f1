"""MoE FFN forward+backward time over a dense SwiGLU MLP with the same active FLOPs, side by side.

For Top-2 and for Top-P (router scale calibrated so the mean experts per token is near
`bench.target_mean_k`; the measured mean k is reported), every dispatch strategy of
`kuaijax.models.moe.moe_ffn` ('auto', 'dense' = every expert on every token, 'capacity', 'dropless')
and a 'dropless' baseline whose grouped matmul is plain `jax.lax.ragged_dot` are timed as
jit(grad) of sum(y * cotangent) w.r.t. (x, router_w, w1, w3, w2). The reference is a dense
SwiGLU of width round(mean_k * f) timed the same way. Timings are interleaved (one call of each
variant per round, median over rounds) so machine load hits every variant alike.
Writes results.json, results.md and times.png (the ratios as bars) into the workdir.
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

from kuaijax import plotting
from kuaijax.models import moe
from kuaijax.train.trainer import write_results
from pallas_kernels.common import markdown_table


def _ragged_dot(lhs, rhs, group_sizes):
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def calibrate_router_scale(x, router_dir, *, p: float, k_max: int, target: float) -> float:
  """Scale s of the router weights whose Top-P mean experts per token is closest to `target`."""

  @jax.jit
  def mean_k(scale):
    _, _, _, ids, _ = moe.route(
      x, scale * router_dir, routing_name='top_p', p=p, k=1, k_max=k_max, renormalize=False
    )
    return jnp.mean(jnp.sum(ids < router_dir.shape[1], axis=-1))

  lo, hi = 0.0, 64.0  # mean k falls as the logits sharpen
  for _ in range(24):
    mid = 0.5 * (lo + hi)
    if float(mean_k(mid)) > target:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def _interleaved_times(fns: dict, args: dict, rounds: int) -> dict:
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))  # compile + warm up
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def run(config, workdir: str) -> dict:
  b = config.bench
  dtype = jnp.dtype(b.dtype)
  tokens, d, f, num_experts = b.tokens, b.d_model, b.d_ff, b.num_experts
  keys = jax.random.split(jax.random.key(b.seed), 8)
  x = jax.random.normal(keys[0], (tokens, d), dtype)
  router_dir = jax.random.normal(keys[1], (d, num_experts), jnp.float32) / np.sqrt(d)
  std = 1.0 / np.sqrt(d)
  w1 = (std * jax.random.normal(keys[2], (num_experts, d, f))).astype(dtype)
  w3 = (std * jax.random.normal(keys[3], (num_experts, d, f))).astype(dtype)
  w2 = (jax.random.normal(keys[4], (num_experts, f, d)) / np.sqrt(f)).astype(dtype)
  cotangent = jax.random.normal(keys[5], (tokens, d), dtype)

  settings = {
    'top_k': dict(routing='top_k', k=b.k, router_w=router_dir),
    'top_p': dict(
      routing='top_p',
      p=b.p,
      k_max=b.k_max,
      router_w=calibrate_router_scale(x, router_dir, p=b.p, k_max=b.k_max, target=b.target_mean_k)
      * router_dir,
    ),
  }
  variants = {
    'auto': dict(dispatch='auto'),
    'dense (all experts)': dict(dispatch='dense'),
    'capacity': dict(dispatch='capacity', capacity_factor=b.capacity_factor),
    'dropless (gmm)': dict(dispatch='dropless'),
    'dropless (ragged_dot)': dict(dispatch='dropless', grouped_matmul=_ragged_dot),
  }
  rows, payload = (
    [],
    {
      'device': jax.devices()[0].device_kind,
      'backend': jax.default_backend(),
      'tokens': tokens,
      'd_model': d,
      'd_ff': f,
      'num_experts': num_experts,
      'dtype': b.dtype,
      'rounds': b.rounds,
      'settings': {},
    },
  )
  for setting, opts in settings.items():
    opts = dict(opts)
    router_w = opts.pop('router_w')
    _, aux = jax.jit(functools.partial(moe.moe_ffn, dispatch='dense', **opts))(
      x, router_w, w1, w3, w2
    )
    mean_k = float(aux['mean_k'])
    width = max(1, round(mean_k * f))
    dense_w = [
      (std * jax.random.normal(keys[6], (d, width))).astype(dtype),
      (std * jax.random.normal(keys[7], (d, width))).astype(dtype),
      (jax.random.normal(keys[6], (width, d)) / np.sqrt(width)).astype(dtype),
    ]

    def grad_of(fn, num_args):
      def loss(*params):
        return jnp.sum((fn(*params) * cotangent).astype(jnp.float32))

      return jax.jit(jax.grad(loss, argnums=tuple(range(num_args))))

    fns, args = {'dense SwiGLU (same active FLOPs)': grad_of(moe.swiglu, 4)}, {}
    args['dense SwiGLU (same active FLOPs)'] = (x, *dense_w)
    drop_rates = {}
    for name, v in variants.items():
      call = functools.partial(moe.moe_ffn, **opts, **v)
      fns[name] = grad_of(lambda *a, call=call: call(*a)[0], 5)
      args[name] = (x, router_w, w1, w3, w2)
      drop_rates[name] = float(jax.jit(call)(x, router_w, w1, w3, w2)[1]['drop_rate'])
    logging.info('bench_moe: timing %d variants of %s (mean k %.3f)', len(fns), setting, mean_k)
    times = _interleaved_times(fns, args, b.rounds)
    base = times['dense SwiGLU (same active FLOPs)']
    resolved = moe.resolve_dispatch('auto', num_experts, b.k if setting == 'top_k' else b.k_max)
    info = {'mean_k': mean_k, 'max_k': float(aux['max_k']), 'dense_width': width, 'times_s': {}}
    for name, t in times.items():
      ratio = t / base
      info['times_s'][name] = t
      rows.append(
        {
          'routing': setting,
          'mean k': f'{mean_k:.3f}',
          'variant': name + (f' -> {resolved}' if name == 'auto' else ''),
          'fwd+bwd ms': 1e3 * t,
          'x dense-equivalent': ratio,
          'drop rate': drop_rates.get(name, 0.0),
        }
      )
    info['ratios'] = {name: t / base for name, t in times.items()}
    info['auto_resolves_to'] = resolved
    info['drop_rates'] = drop_rates
    payload['settings'][setting] = info
  columns = ['routing', 'mean k', 'variant', 'fwd+bwd ms', 'x dense-equivalent', 'drop rate']
  header = (
    f'MoE FFN fwd+bwd on {payload["device"]} ({payload["backend"]}): T={tokens}, d={d}, f={f}, '
    f'E={num_experts}, {b.dtype}; Top-P p={b.p}, k_max={b.k_max}; capacity_factor='
    f'{b.capacity_factor}; median of {b.rounds} interleaved rounds.\n\n'
  )
  table = header + markdown_table(rows, columns)
  os.makedirs(workdir, exist_ok=True)
  plotting.write_bar_chart(
    workdir,
    'times.png',
    {s: info['ratios'] for s, info in payload['settings'].items()},
    title=f'MoE FFN fwd+bwd time on {payload["device"]}',
    xlabel='x the dense SwiGLU of equal active FLOPs',
  )
  write_results(workdir, payload, table)
  print(table)
  return payload
