"""gmm benchmark: each implementation vs a dense matmul of equal FLOPs and `jax.lax.ragged_dot`, in one process.

  python -m pallas_kernels.gmm.bench --out /tmp/gmm_bench [--shapes small,moe --dtypes float32 --rounds 5]

Times the forward and forward+backward (grads w.r.t. lhs and rhs) of every implementation that runs on the
current backend ('xla' everywhere, the Pallas kernel on GPU/TPU, 'interpret' with --interpret), the dense
[m,k] x [k,n] matmul (the same FLOPs as a grouped matmul whose groups cover all rows) and ragged_dot, all
through `kuaijax.benchmarking.interleaved` (wall clock, --warmup calls excluded, every program of a shape
and dtype called once per round in turn over --rounds rounds). Writes gmm_bench.json and gmm_bench.md into
--out; ratios are the median (min-max) over rounds of time / dense time of the same pass and round.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kuaijax import benchmarking
from pallas_kernels.common import markdown_table, write_report
from pallas_kernels.gmm import gmm

# (name, m, k, n, G): a tiny shape for tests (not in the default --shapes), a small smoke shape, and
# the MoE shape: 8192 tokens x 2 experts per token, 8 experts.
SHAPES = (('tiny', 256, 32, 64, 4), ('small', 2048, 256, 512, 4), ('moe', 16384, 512, 1024, 8))


def uneven_group_sizes(m: int, num_groups: int, seed: int = 0) -> np.ndarray:
  """Deterministic, uneven sizes summing to m (Dirichlet(0.7) shares, like a skewed router)."""
  shares = np.random.default_rng(seed).dirichlet(np.full(num_groups, 0.7))
  sizes = np.floor(shares * m).astype(np.int32)
  sizes[np.argmax(sizes)] += m - sizes.sum()
  return sizes


def _fwd_bwd(fn):
  """fn(lhs, rhs) -> out  ==>  jitted (lhs, rhs, ct) -> (d lhs, d rhs); tanh keeps the forward pass live."""

  def loss(lhs, rhs, ct):
    return jnp.vdot(jnp.tanh(fn(lhs, rhs).astype(jnp.float32)), ct)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def bench_shape(name, m, k, n, num_groups, dtype, implementations, rounds, warmup):
  key_l, key_r, key_c = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(key_l, (m, k), dtype)
  rhs = jax.random.normal(key_r, (num_groups, k, n), dtype) / np.sqrt(k)
  ct = jax.random.normal(key_c, (m, n), jnp.float32)
  dense_rhs = rhs[0]
  sizes = jnp.asarray(uneven_group_sizes(m, num_groups))

  candidates = {
    'dense': (lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), dense_rhs)
  }
  candidates['ragged_dot'] = (
    lambda x, w: jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32),
    rhs,
  )
  for impl in implementations:
    candidates[f'gmm[{impl}]'] = (
      lambda x, w, impl=impl: gmm(
        x, w, sizes, preferred_element_type=jnp.float32, implementation=impl
      ),
      rhs,
    )

  sides = {}
  for label, (fn, weights) in candidates.items():
    sides[(label, 'fwd')] = functools.partial(jax.jit(fn), lhs, weights)
    sides[(label, 'fwd_bwd')] = functools.partial(_fwd_bwd(fn), lhs, weights, ct)
  times = benchmarking.interleaved(sides, rounds=rounds, warmup=warmup)
  gflop = 2 * m * k * n / 1e9
  rows = []
  for label in candidates:
    fwd, fwd_bwd = times[(label, 'fwd')], times[(label, 'fwd_bwd')]
    fwd_ratio = benchmarking.ratio(fwd, times[('dense', 'fwd')])
    fwd_bwd_ratio = benchmarking.ratio(fwd_bwd, times[('dense', 'fwd_bwd')])
    rows.append(
      {
        'shape': name,
        'm,k,n,G': f'{m},{k},{n},{num_groups}',
        'dtype': jnp.dtype(dtype).name,
        'impl': label,
        'fwd_ms': 1e3 * fwd.median,
        'fwd_ms_min_max': f'{1e3 * fwd.low:.4g}-{1e3 * fwd.high:.4g}',
        'fwd_bwd_ms': 1e3 * fwd_bwd.median,
        'fwd_bwd_ms_min_max': f'{1e3 * fwd_bwd.low:.4g}-{1e3 * fwd_bwd.high:.4g}',
        'fwd_vs_dense': fwd_ratio.text(),
        'fwd_bwd_vs_dense': fwd_bwd_ratio.text(),
        'fwd_gflops': gflop / fwd.median,
        'fwd_bwd_gflops': 3 * gflop / fwd_bwd.median,
        'timings': {'fwd': fwd.summary(), 'fwd_bwd': fwd_bwd.summary()},
        'ratios_to_dense': {'fwd': fwd_ratio.summary(), 'fwd_bwd': fwd_bwd_ratio.summary()},
      }
    )
    print(
      {k: v for k, v in rows[-1].items() if k not in ('timings', 'ratios_to_dense')}, flush=True
    )
  return rows, sizes.tolist()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='directory for gmm_bench.json / gmm_bench.md')
  parser.add_argument('--shapes', default='small,moe', help='comma list from: tiny, small, moe')
  parser.add_argument('--dtypes', default='float32', help='comma list, e.g. float32,bfloat16')
  parser.add_argument('--rounds', type=int, default=5, help='interleaved timed rounds (>= 5)')
  parser.add_argument('--warmup', type=int, default=1, help='untimed calls of each program first')
  parser.add_argument('--interpret', action='store_true', help="also time 'interpret' (slow)")
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  implementations = ['xla'] + (['pallas'] if backend in ('gpu', 'tpu') else [])
  implementations += ['interpret'] if args.interpret else []
  wanted = args.shapes.split(',')
  unknown = set(wanted) - {s[0] for s in SHAPES}
  if unknown:
    raise ValueError(f'--shapes: unknown {sorted(unknown)}; choose from {[s[0] for s in SHAPES]}')
  rows, group_sizes = [], {}
  for shape in SHAPES:
    if shape[0] not in wanted:
      continue
    for dtype in args.dtypes.split(','):
      shape_rows, group_sizes[shape[0]] = bench_shape(
        *shape, jnp.dtype(dtype), implementations, args.rounds, args.warmup
      )
      rows += shape_rows
  columns = ['shape', 'm,k,n,G', 'dtype', 'impl', 'fwd_ms', 'fwd_ms_min_max', 'fwd_bwd_ms']
  columns += ['fwd_bwd_ms_min_max', 'fwd_vs_dense', 'fwd_bwd_vs_dense', 'fwd_gflops']
  columns += ['fwd_bwd_gflops']
  what = (
    f'gmm vs dense matmul of equal FLOPs and ragged_dot on {backend} '
    f'({jax.devices()[0].device_kind}); ratios are medians (min-max) of per-round ratios'
  )
  table = benchmarking.header(what, rounds=args.rounds, warmup=args.warmup)
  table += f'group sizes: {group_sizes}\n\n' + markdown_table(rows, columns)
  payload = {
    'backend': backend,
    'device': jax.devices()[0].device_kind,
    'threads': benchmarking.thread_counts(),
    'command': benchmarking.command_line(),
    'rounds': args.rounds,
    'warmup': args.warmup,
    'group_sizes': group_sizes,
    'rows': rows,
  }
  write_report(args.out, 'gmm_bench', payload, table)
  print(table)
  return payload


if __name__ == '__main__':
  main()
