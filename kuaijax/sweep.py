"""Sweeps: a config file declares a grid of overrides; run it here, print it, or collect a table.

A config file declares its sweep next to `get_config` (as big_vision's `get_hyper`):

  def get_hyper(hyper, arg=None):
    return hyper.product([
      hyper.sweep('optimizer.lr', [1e-3, 3e-3]),
      hyper.zip_([hyper.sweep('model.d_model', [64, 128]), hyper.sweep('model.num_layers', [2, 4])]),
    ])

`hyper` is this module; keys are config fields ('model.d_model' or 'config.model.d_model'); `arg` is
the config's `:arg` suffix. Then

  python -m kuaijax.sweep --config=configs/x.py:runlocal --workdir=ROOT            # run, resumable
  python -m kuaijax.sweep --config=configs/x.py:runlocal --workdir=ROOT --print    # commands
  python -m kuaijax.sweep --config=configs/x.py:runlocal --workdir=ROOT --collect  # table

Run i works in ROOT/<name>, the name spelled from its overrides; a run whose results.json exists is
finished and skipped. Every override is checked against the config (the key exists, the value has
its type) before anything runs. The collector puts each run's overrides and results.json scalars into
ROOT/sweep.md and ROOT/sweep.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import ml_collections

from kuaijax import config_lib

Overrides = dict[str, object]


def _key(key: str) -> str:
  return key.removeprefix('config.')


def sweep(key: str, values: Iterable) -> list[Overrides]:
  """One run per value of config field `key`."""
  return [{_key(key): v} for v in values]


def fixed(key: str, value) -> list[Overrides]:
  """The same value of `key` in every run (combine with `product`)."""
  return [{_key(key): value}]


def product(parts: Sequence[list[Overrides]]) -> list[Overrides]:
  """Every combination of the parts' runs (the last part varies fastest)."""
  return [_merge(combo) for combo in itertools.product(*parts)]


def zip_(parts: Sequence[list[Overrides]]) -> list[Overrides]:
  """The i-th runs of all parts together; the parts must have equal lengths."""
  lengths = [len(p) for p in parts]
  if len(set(lengths)) > 1:
    raise ValueError(f'zip_ needs parts of equal length, got {lengths}')
  return [_merge(combo) for combo in zip(*parts)]


def _merge(dicts) -> Overrides:
  out = {}
  for d in dicts:
    clash = set(out) & set(d)
    if clash:
      raise ValueError(f'sweep sets {sorted(clash)} twice in one run')
    out.update(d)
  return out


def run_name(overrides: Overrides) -> str:
  """A folder name for a run, e.g. 'model.d_model=64,optimizer.lr=0.001'."""
  if not overrides:
    return 'base'
  items = (f'{k}={_format(v)}' for k, v in sorted(overrides.items()))
  return ','.join(items).replace('/', '_').replace(' ', '')


def _format(value) -> str:
  return ','.join(map(str, value)) if isinstance(value, list | tuple) else str(value)


@dataclasses.dataclass
class SweepRun:
  name: str
  overrides: Overrides
  config: ml_collections.ConfigDict
  workdir: str

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, 'results.json'))


def apply_overrides(config: ml_collections.ConfigDict, overrides: Overrides):
  """A copy of `config` with `overrides`; an unknown field or a wrong type is an error naming it."""
  config = config.copy_and_resolve_references()
  config.lock()
  for key, value in overrides.items():
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = sorted(node) if isinstance(node, ml_collections.ConfigDict) else []
        raise KeyError(
          f'sweep key {key!r} is not a config field: no {".".join(parts[: i + 1])!r}'
          + (f' (fields there: {known})' if known else '')
        )
      node = node[part] if i < len(parts) - 1 else node
    try:
      node[parts[-1]] = value
    except TypeError as e:
      raise TypeError(f'sweep key {key!r}: value {value!r} does not fit the field ({e})') from e
  return config


def plan(
  config, hyper_runs: list[Overrides], root: str, names: Sequence[str] | None = None
) -> list[SweepRun]:
  """Checks every run's overrides against `config` and gives each run its workdir under `root`.

  Runs are named by `run_name(overrides)` unless `names` are given.
  """
  names = list(names) if names is not None else [run_name(o) for o in hyper_runs]
  runs = [
    SweepRun(n, o, apply_overrides(config, o), os.path.join(root, n))
    for n, o in zip(names, hyper_runs, strict=True)
  ]
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'the sweep repeats runs: {sorted({n for n in names if names.count(n) > 1})}')
  return runs


def load_sweep(spec: str, root: str) -> list[SweepRun]:
  """The runs declared by `get_hyper` of config file `spec` ('path.py[:arg]')."""
  path, _, arg = spec.partition(':')
  module = config_lib.load_config_module(path)
  if not hasattr(module, 'get_hyper'):
    raise ValueError(f'{path} declares no sweep: it has no get_hyper(hyper, arg=None)')
  return plan(
    config_lib.load_config(spec), module.get_hyper(sys.modules[__name__], arg or None), root
  )


def run_sweep(runs: Sequence[SweepRun], runner: Callable | None = None) -> dict[str, float]:
  """Runs the unfinished runs one after another; returns {name: seconds} of the runs it ran."""
  if runner is None:
    from kuaijax.main import run_experiment as runner
  ran = {}
  for i, run in enumerate(runs):
    if run.finished:
      print(f'[{i + 1}/{len(runs)}] {run.name}: finished, skipped', flush=True)
      continue
    print(f'[{i + 1}/{len(runs)}] {run.name} -> {run.workdir}', flush=True)
    start = time.perf_counter()
    runner(run.config, run.workdir)
    ran[run.name] = time.perf_counter() - start
  return ran


def commands(spec: str, runs: Sequence[SweepRun]) -> list[str]:
  """One `python -m kuaijax.main` command line per run (for a cluster scheduler)."""
  out = []
  for run in runs:
    flags = [f'--config.{k}={_format(v)}' for k, v in sorted(run.overrides.items())]
    argv = ['python', '-m', 'kuaijax.main', f'--config={spec}', f'--workdir={run.workdir}', *flags]
    out.append(' '.join(map(shlex.quote, argv)))
  return out


def _flatten(tree, prefix=''):
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      yield from _flatten(value, name + '.')
    elif isinstance(value, int | float | str | bool):
      yield name, value


def collect(runs: Sequence[SweepRun], root: str, metrics: Sequence[str] = ()) -> list[dict]:
  """One row per run (its overrides, then results.json scalars, or only `metrics` when given).

  Writes ROOT/sweep.json and ROOT/sweep.md; an unfinished run gets status 'missing'.
  """
  keys = sorted({k for r in runs for k in r.overrides})
  rows = []
  for run in runs:
    row = {'run': run.name, **run.overrides}
    if run.finished:
      with open(os.path.join(run.workdir, 'results.json')) as f:
        values = dict(_flatten(json.load(f)))
      row.update({k: values.get(k) for k in metrics} if metrics else values)
      row['status'] = 'done'
    else:
      row['status'] = 'missing'
    rows.append(row)
  columns = ['run', *keys, 'status']
  columns += [c for c in (metrics or sorted({k for r in rows for k in r} - set(columns)))]
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(row.get(c)) for c in columns) + ' |')
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'sweep.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(root, 'sweep.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return rows


def _cell(value) -> str:
  if value is None:
    return ''
  return f'{value:.4g}' if isinstance(value, float) else _format(value)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m kuaijax.sweep', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--config', required=True, help='config file with get_hyper, [:arg]')
  parser.add_argument('--workdir', required=True, help='root folder; run i writes ROOT/<name>')
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument('--print', action='store_true', help='print the commands, run nothing')
  mode.add_argument('--collect', action='store_true', help='only write the table')
  parser.add_argument('--metrics', default='', help='comma-separated results.json keys to tabulate')
  args = parser.parse_args(argv)
  root = os.path.abspath(os.path.expanduser(args.workdir))
  runs = load_sweep(args.config, root)
  if args.print:
    print('\n'.join(commands(args.config, runs)))
    return 0
  if not args.collect:
    run_sweep(runs)
  rows = collect(runs, root, [m for m in args.metrics.split(',') if m])
  with open(os.path.join(root, 'sweep.md')) as f:
    print(f.read())
  return 0 if all(r['status'] == 'done' for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
