"""Benchmark: the fused router vs the unfused `kuaijax.routing` path, side by side in one process.

  python -m pallas_kernels.topp_router.bench --out DIR [--tokens 8192 --d 512 --experts 8,16,64]
    [--rounds 10 --warmup 1]

Times forward and forward+backward (gradients w.r.t. x and router_w of the kept weights plus a
z-loss on the logits) of every implementation runnable here ('xla' always, 'pallas' on GPU/TPU)
and of the reference, at Top-P p=0.4, k_max=4, through `kuaijax.benchmarking.interleaved` (wall
clock, --warmup calls excluded, every program of an expert count called once per round in turn);
ratios to the reference are medians (min-max) of per-round ratios. Writes topp_router.json and
topp_router.md into DIR.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kuaijax import benchmarking
from pallas_kernels.common import markdown_table, write_report
from pallas_kernels.topp_router import reference
from pallas_kernels.topp_router.api import topp_router


def _fns(impl: str, p: float, k_max: int):
  if impl == 'reference':
    route = lambda x, w: reference.topp_router(x, w, p=p, k_max=k_max)
  else:
    route = lambda x, w: topp_router(x, w, p=p, k_max=k_max, implementation=impl)

  def loss(x, w):
    weights, _, _, logits = route(x, w)
    return jnp.sum(weights) + 1e-3 * jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)

  return jax.jit(route), jax.jit(jax.grad(loss, argnums=(0, 1)))


def run(
  out_dir: str, tokens: int, d: int, experts: list[int], dtype: str, rounds: int, warmup: int
) -> dict:
  impls = ['reference', 'xla'] + (['pallas'] if jax.default_backend() in ('gpu', 'tpu') else [])
  rows = []
  for e in experts:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(tokens, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, e)) / np.sqrt(d), dtype)
    sides = {}
    for impl in impls:
      fwd, grad = _fns(impl, 0.4, min(4, e))
      sides[(impl, 'fwd')] = functools.partial(fwd, x, w)
      sides[(impl, 'fwd_bwd')] = functools.partial(grad, x, w)
    times = benchmarking.interleaved(sides, rounds=rounds, warmup=warmup)
    for impl in impls:
      t_fwd, t_bwd = times[(impl, 'fwd')], times[(impl, 'fwd_bwd')]
      fwd_ratio = benchmarking.ratio(t_fwd, times[('reference', 'fwd')])
      bwd_ratio = benchmarking.ratio(t_bwd, times[('reference', 'fwd_bwd')])
      rows.append(
        dict(
          experts=e,
          implementation=impl,
          fwd_ms=t_fwd.median * 1e3,
          fwd_ms_min_max=f'{t_fwd.low * 1e3:.4g}-{t_fwd.high * 1e3:.4g}',
          fwd_bwd_ms=t_bwd.median * 1e3,
          fwd_bwd_ms_min_max=f'{t_bwd.low * 1e3:.4g}-{t_bwd.high * 1e3:.4g}',
          fwd_vs_reference=fwd_ratio.text(),
          fwd_bwd_vs_reference=bwd_ratio.text(),
          timings={'fwd': t_fwd.summary(), 'fwd_bwd': t_bwd.summary()},
          ratios_to_reference={'fwd': fwd_ratio.summary(), 'fwd_bwd': bwd_ratio.summary()},
        )
      )
  payload = dict(
    backend=jax.default_backend(),
    device=str(jax.devices()[0]),
    threads=benchmarking.thread_counts(),
    command=benchmarking.command_line(),
    rounds=rounds,
    warmup=warmup,
    tokens=tokens,
    d=d,
    dtype=dtype,
    p=0.4,
    k_max='min(4, E)',
    rows=rows,
  )
  columns = [c for c in rows[0] if c not in ('timings', 'ratios_to_reference')]
  what = (
    f'topp_router vs unfused kuaijax.routing ({payload["device"]}, T={tokens}, d={d}, {dtype}, '
    f'p=0.4, k_max=min(4, E)); ratios are medians (min-max) of per-round ratios'
  )
  table = benchmarking.header(what, rounds=rounds, warmup=warmup) + markdown_table(rows, columns)
  write_report(out_dir, 'topp_router', payload, table)
  print(table)
  return payload


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='directory for topp_router.json / .md')
  parser.add_argument('--tokens', type=int, default=8192)
  parser.add_argument('--d', type=int, default=512)
  parser.add_argument('--experts', default='8,16,64', help='comma-separated expert counts')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--rounds', type=int, default=10, help='interleaved timed rounds (>= 5)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls of each program first')
  args = parser.parse_args(argv)
  experts = [int(e) for e in args.experts.split(',')]
  return run(args.out, args.tokens, args.d, experts, args.dtype, args.rounds, args.warmup)


if __name__ == '__main__':
  main()
