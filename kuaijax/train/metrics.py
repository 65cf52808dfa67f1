"""Metrics to workdir/metrics.jsonl and TensorBoard (process 0 only), and a progress bar."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
import tqdm


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
  """Appends one JSON line per logged step; mirrors scalars to TensorBoard event files."""

  def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after `step` (a resumed run re-logs them), keeping earlier ones."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(self.path, 'w') as f:
      f.writelines(lines)

  def write(self, step: int, metrics: dict) -> dict:
    record = {'step': int(step), **{k: _to_python(v) for k, v in metrics.items()}}
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
      if self._tb is not None:
        for key, value in record.items():
          if key != 'step' and isinstance(value, int | float) and math.isfinite(value):
            self._tb.add_scalar(key, value, step)
    return record

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of workdir/metrics.jsonl, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """tqdm bar over steps showing loss and tokens/s."""

  def __init__(self, start: int, total: int, *, enabled: bool):
    self._bar = tqdm.tqdm(
      total=total,
      initial=start,
      disable=not enabled,
      dynamic_ncols=True,
      mininterval=1.0,
      desc='train',
    )
    self._t0, self._tokens = time.perf_counter(), 0

  def update(self, steps: int, tokens: int, loss: float | None = None) -> float:
    """Advances the bar; returns tokens/s since the last update."""
    now = time.perf_counter()
    rate = tokens / max(now - self._t0, 1e-9)
    self._t0 = now
    postfix = {'tok/s': f'{rate:,.0f}'}
    if loss is not None:
      postfix['loss'] = f'{loss:.4f}'
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(steps)
    return rate

  def close(self):
    self._bar.close()


def plot_loss_curve(train_workdir: str, png_path: str) -> None:
  """The training loss of `train_workdir/metrics.jsonl` (resumed runs included) as a PNG."""
  from matplotlib.figure import Figure

  records = [r for r in read_metrics(train_workdir) if 'loss' in r]
  fig = Figure(figsize=(5, 3.5))
  ax = fig.add_subplot()
  ax.plot([r['step'] for r in records], [r['loss'] for r in records])
  ax.set(xlabel='step', ylabel='training loss', yscale='log')
  fig.tight_layout()
  fig.savefig(png_path, dpi=80)
