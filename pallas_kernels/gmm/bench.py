"""gmm benchmark: each implementation vs a dense matmul of equal FLOPs and `jax.lax.ragged_dot`, in one process.

  python -m pallas_kernels.gmm.bench --out /tmp/gmm_bench

Times the forward and forward+backward (grads w.r.t. lhs and rhs) of every implementation that runs on the
current backend ('xla' everywhere, the Pallas kernel on GPU/TPU, 'interpret' with --interpret), the dense
[m,k] x [k,n] matmul (the same FLOPs as a grouped matmul whose groups cover all rows) and ragged_dot. Writes
gmm_bench.json and gmm_bench.md into --out; ratios are time / dense time of the same pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import markdown_table, time_fn, write_report
from pallas_kernels.gmm import gmm

# (name, m, k, n, G): a small smoke shape, and the MoE shape: 8192 tokens x 2 experts per token, 8 experts.
SHAPES = (('small', 2048, 256, 512, 4), ('moe', 16384, 512, 1024, 8))


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


def cpu_time_fn(fn, *args, warmup: int = 2, iters: int = 5) -> float:
  """Like common.time_fn but in process CPU seconds: stable on a shared, loaded machine (all threads count)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.process_time()
    jax.block_until_ready(fn(*args))
    times.append(time.process_time() - start)
  return statistics.median(times)


def bench_shape(name, m, k, n, num_groups, dtype, implementations, iters, timer):
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

  rows = []
  times = {}
  for label, (fn, weights) in candidates.items():
    fwd = jax.jit(fn)
    grad = _fwd_bwd(fn)
    times[label] = (
      timer(fwd, lhs, weights, iters=iters),
      timer(grad, lhs, weights, ct, iters=iters),
    )
  gflop = 2 * m * k * n / 1e9
  for label, (t_fwd, t_bwd) in times.items():
    rows.append(
      {
        'shape': name,
        'm,k,n,G': f'{m},{k},{n},{num_groups}',
        'dtype': jnp.dtype(dtype).name,
        'impl': label,
        'fwd_ms': 1e3 * t_fwd,
        'fwd_bwd_ms': 1e3 * t_bwd,
        'fwd_vs_dense': t_fwd / times['dense'][0],
        'fwd_bwd_vs_dense': t_bwd / times['dense'][1],
        'fwd_gflops': gflop / t_fwd,
        'fwd_bwd_gflops': 3 * gflop / t_bwd,
      }
    )
    print(rows[-1], flush=True)
  return rows, sizes.tolist()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='directory for gmm_bench.json / gmm_bench.md')
  parser.add_argument('--shapes', default='small,moe', help='comma list from: small, moe')
  parser.add_argument('--dtypes', default='float32', help='comma list, e.g. float32,bfloat16')
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument(
    '--clock',
    default='wall',
    choices=('wall', 'cpu'),
    help='wall: median wall time; cpu: median process CPU time (use on a loaded machine, with XLA_FLAGS='
    '"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" for one compute thread)',
  )
  parser.add_argument('--interpret', action='store_true', help="also time 'interpret' (slow)")
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  timer = time_fn if args.clock == 'wall' else cpu_time_fn
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
        *shape, jnp.dtype(dtype), implementations, args.iters, timer
      )
      rows += shape_rows
  columns = ['shape', 'm,k,n,G', 'dtype', 'impl', 'fwd_ms', 'fwd_bwd_ms', 'fwd_vs_dense']
  columns += ['fwd_bwd_vs_dense', 'fwd_gflops', 'fwd_bwd_gflops']
  header = f'# gmm benchmark ({backend}: {jax.devices()[0].device_kind}, {args.clock} clock)\n\n'
  header += f'group sizes: {group_sizes}\n\n'
  table = header + markdown_table(rows, columns)
  payload = {
    'backend': backend,
    'device': jax.devices()[0].device_kind,
    'clock': args.clock,
    'group_sizes': group_sizes,
  }
  payload['rows'] = rows
  write_report(args.out, 'gmm_bench', payload, table)
  print(table)


if __name__ == '__main__':
  main()
