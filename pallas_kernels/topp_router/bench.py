"""Benchmark: the fused router vs the unfused `kuaijax.routing` path, side by side in one process.

  python -m pallas_kernels.topp_router.bench --out DIR [--tokens 8192 --d 512 --experts 8,16,64]

Times forward and forward+backward (gradients w.r.t. x and router_w of the kept weights plus a
z-loss on the logits) of every implementation runnable here ('xla' always, 'pallas' on GPU/TPU)
and of the reference, at Top-P p=0.4, k_max=4. Writes topp_router.json and topp_router.md into DIR.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import markdown_table, time_fn, write_report
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


def run(out_dir: str, tokens: int, d: int, experts: list[int], dtype: str, iters: int) -> dict:
  impls = ['reference', 'xla'] + (['pallas'] if jax.default_backend() in ('gpu', 'tpu') else [])
  rows = []
  for e in experts:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(tokens, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, e)) / np.sqrt(d), dtype)
    base = {}
    for impl in impls:
      fwd, grad = _fns(impl, 0.4, min(4, e))
      t_fwd = time_fn(fwd, x, w, iters=iters)
      t_bwd = time_fn(grad, x, w, iters=iters)
      base.setdefault('fwd', t_fwd)
      base.setdefault('fwd_bwd', t_bwd)
      rows.append(
        dict(
          experts=e,
          implementation=impl,
          fwd_ms=t_fwd * 1e3,
          fwd_bwd_ms=t_bwd * 1e3,
          fwd_vs_reference=t_fwd / base['fwd'],
          fwd_bwd_vs_reference=t_bwd / base['fwd_bwd'],
        )
      )
  payload = dict(
    backend=jax.default_backend(),
    device=str(jax.devices()[0]),
    tokens=tokens,
    d=d,
    dtype=dtype,
    p=0.4,
    k_max='min(4, E)',
    rows=rows,
  )
  columns = list(rows[0])
  title = (
    f'## topp_router vs unfused kuaijax.routing ({payload["device"]}, T={tokens}, d={d}, '
    f'{dtype}, p=0.4, k_max=min(4, E))\n\n'
  )
  table = title + markdown_table(rows, columns)
  write_report(out_dir, 'topp_router', payload, table)
  print(table)
  return payload


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='directory for topp_router.json / .md')
  parser.add_argument('--tokens', type=int, default=8192)
  parser.add_argument('--d', type=int, default=512)
  parser.add_argument('--experts', default='8,16,64', help='comma-separated expert counts')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--iters', type=int, default=10)
  args = parser.parse_args()
  experts = [int(e) for e in args.experts.split(',')]
  run(args.out, args.tokens, args.d, experts, args.dtype, args.iters)


if __name__ == '__main__':
  main()
