"""The one benchmark harness: wall clock, warm-up excluded, sides interleaved, median and spread.

Every `bench_*` experiment and kernel bench times its sides through `interleaved`: each side is
called `warmup` times first (compilation, caches), then once per round in turn, so machine load
falls on every side alike; the figures are wall-clock seconds (`time.perf_counter`) with the
outputs blocked on. A comparison is reported as the median of the per-round ratios with their
min..max, next to the thread counts each runtime was allowed (`thread_counts`; the torch side is
set to the same number of threads as XLA's CPU pool) and the command that produced it
(`command_line`). `synthetic_lm_batch` is the training benches' shared input.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock seconds of one side, one entry per round."""

  seconds: tuple[float, ...]

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  @property
  def low(self) -> float:
    return min(self.seconds)

  @property
  def high(self) -> float:
    return max(self.seconds)

  def summary(self) -> dict:
    return dict(median_s=self.median, min_s=self.low, max_s=self.high, rounds=list(self.seconds))

  def rate_cells(self, count: float, spec: str = ',.0f') -> str:
    """'median | slowest-fastest' of `count` per second: two markdown table cells."""
    return f'{count / self.median:{spec}} | {count / self.high:{spec}}-{count / self.low:{spec}}'


@dataclasses.dataclass(frozen=True)
class Ratio:
  """Per-round ratios a / b of two interleaved sides (rounds pair up: same load)."""

  values: tuple[float, ...]

  @property
  def median(self) -> float:
    return statistics.median(self.values)

  def text(self) -> str:
    """'1.23x (1.20-1.27)': the median ratio and its min-max over rounds."""
    return f'{self.median:.2f}x ({min(self.values):.2f}-{max(self.values):.2f})'

  def summary(self) -> dict:
    return dict(median=self.median, min=min(self.values), max=max(self.values))


def ratio(a: Timing, b: Timing) -> Ratio:
  if len(a.seconds) != len(b.seconds):
    raise ValueError(
      f'ratio of {len(a.seconds)} and {len(b.seconds)} rounds: time both sides together'
    )
  return Ratio(tuple(x / y for x, y in zip(a.seconds, b.seconds)))


def cpu_threads() -> int:
  """The cores this process may use: XLA's CPU thread pool has one thread per core."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def match_torch_threads() -> int:
  """Gives torch's intra-op pool as many threads as XLA's CPU pool (equal threads on both sides)."""
  import torch  # noqa: PLC0415  (test/reference dependency, only for benches with a torch side)

  torch.set_num_threads(cpu_threads())
  return torch.get_num_threads()


def thread_counts() -> dict:
  """The thread counts in force: XLA's CPU pool (one per usable core) and torch's, if imported."""
  counts = {'xla_cpu_threads': cpu_threads(), 'backend': jax.default_backend()}
  torch = sys.modules.get('torch')
  if torch is not None:
    counts['torch_threads'] = torch.get_num_threads()
  return counts


def interleaved(
  sides: Mapping[str, Callable[[], object]], *, rounds: int = 5, warmup: int = 1
) -> dict[str, Timing]:
  """Wall-clock seconds of each zero-argument side, one call of each per round, in turn.

  Each call's result is blocked on (`jax.block_until_ready`; torch CPU calls return finished
  tensors). Warm-up calls (compilation included) are run first and not recorded.
  """
  if rounds < 1 or warmup < 0:
    raise ValueError(f'rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}')
  for fn in sides.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  seconds = {name: [] for name in sides}
  for _ in range(rounds):
    for name, fn in sides.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds[name].append(time.perf_counter() - start)
  return {name: Timing(tuple(s)) for name, s in seconds.items()}


def command_line() -> str:
  """The command that is running, as a user would type it (`python -m kuaijax.main ...`)."""
  argv = list(sys.argv)
  main = sys.modules.get('__main__')
  spec = getattr(main, '__spec__', None)
  if spec is not None and spec.name:
    argv[0:1] = ['python', '-m', spec.name.removesuffix('.__main__')]
  else:
    argv[0:1] = ['python', argv[0]]
  return shlex.join(argv)


def header(what: str, *, rounds: int, warmup: int) -> str:
  """The line printed above every benchmark table: what, how it was timed, threads, command."""
  threads = ', '.join(f'{k} {v}' for k, v in thread_counts().items())
  return (
    f'{what}: wall clock, median (min-max) of {rounds} interleaved rounds after {warmup} warm-up '
    f'call(s); {threads}.\nCommand: `{command_line()}`\n\n'
  )


def synthetic_lm_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
  """Random full-length token rows (one document per row): a language-model training batch."""
  tokens = np.random.default_rng(seed).integers(3, vocab, (batch, seq_len), dtype=np.int32)
  ones = np.ones((batch, seq_len), np.int32)
  return {
    'inputs': tokens,
    'targets': np.roll(tokens, -1, axis=1),
    'segment_ids': ones,
    'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
    'loss_mask': ones.astype(np.float32),
    'task_ids': np.zeros((batch, seq_len), np.int32),
  }
