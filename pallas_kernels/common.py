"""What every op shares: choosing an implementation (api.py), and writing the benchmarks' reports
(bench.py; the timing itself is `kuaijax.benchmarking`, the harness every benchmark uses)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax

IMPLEMENTATIONS = ('auto', 'xla', 'pallas', 'interpret')


def resolve_implementation(implementation: str, *, op: str) -> str:
  """Maps the public `implementation` argument to 'xla' | 'gpu' | 'tpu' | 'interpret'.

  'auto' picks the Pallas kernel on GPU/TPU and the XLA path elsewhere; 'pallas' insists on the
  kernel and fails on a backend that cannot lower it; 'interpret' runs the kernel body on any
  backend (slow; for tests).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'{op}: implementation={implementation!r} is not one of {IMPLEMENTATIONS}')
  if implementation in ('xla', 'interpret'):
    return implementation
  backend = jax.default_backend()
  if backend in ('gpu', 'cuda', 'rocm'):
    return 'gpu'
  if backend == 'tpu':
    return 'tpu'
  if implementation == 'pallas':
    raise ValueError(
      f"{op}: implementation='pallas' needs a GPU or TPU, but the backend is {backend!r}; "
      "use 'interpret' to run the kernel body here or 'xla'"
    )
  return 'xla'


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A markdown table of `rows` (dicts) with the given columns; floats printed with 4 significant digits."""

  def cell(value):
    return f'{value:.4g}' if isinstance(value, float) else str(value)

  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(row.get(c, '')) for c in columns) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def write_report(out_dir: str, name: str, payload: dict, table: str) -> None:
  """Writes `<name>.json` and `<name>.md` into out_dir (created if missing)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
    json.dump(payload, f, indent=2)
  with open(os.path.join(out_dir, f'{name}.md'), 'w') as f:
    f.write(table)
