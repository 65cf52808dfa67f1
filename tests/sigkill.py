"""Real kills for resume tests: run a command as a subprocess (`python -m kuaijax.main`, the
multi-process launcher, or a test module's own entry point), SIGKILL it at a point drawn from a
seeded RNG (mid-step, or while a checkpoint is being written), and read back what a stage logged
and evaluated.

A kill point names an event in a run folder (a metrics line of a step, a checkpoint's temporary
folder), a delay after it and what dies (the whole run, the launcher, or one of its processes).
The seed is $KJ_KILL_SEED, else a fresh one per test: every test run kills somewhere else, and the
point (seed included) is printed, so a failing test says how to repeat its kill.
"""

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from kuaijax.train.metrics import read_metrics
from tests.conftest import REPO_ROOT

ENV = {**os.environ, 'XLA_FLAGS': ''}  # one CPU device, as a user's plain command
_TMP = '.orbax-checkpoint-tmp'


def run(command: list[str], env: dict | None = None) -> None:
  """Runs `command` to the end in the repository root (an error, with its output, if it fails)."""
  out = subprocess.run(command, cwd=REPO_ROOT, env=env or ENV, capture_output=True, text=True)
  if out.returncode:
    raise AssertionError(f'{command} exited with {out.returncode}:\n{out.stderr[-3000:]}')


def python(module: str, *args) -> list[str]:
  """The command `python -m module args...` (a test module's own entry point, the launcher...)."""
  return [sys.executable, '-m', module, *map(str, args)]


@dataclasses.dataclass(frozen=True)
class KillPoint:
  """SIGKILL `target` `delay` seconds after `event` happened at `step` in the run folder.

  event   'logged': metrics.jsonl holds the record of step `step` (the run is in a later step);
          'checkpointing': the checkpoint of step `step` is being written (its orbax temporary
          folder exists; a write too quick to be seen counts once it is finished)
  target  'all': the command and every process it started; 'launcher': the command only (its
          processes are left to their parent-death signal); 'process <i>': the process group of
          the launcher's process i only (the launcher then stops the others)
  """

  event: str
  step: int
  delay: float = 0.0
  target: str = 'all'
  seed: int | None = None


def kill_seed() -> int:
  """$KJ_KILL_SEED, or a fresh seed."""
  return int(os.environ.get('KJ_KILL_SEED') or random.SystemRandom().randrange(2**31))


def draw_kill_point(
  *,
  logged: list[int],
  checkpointing: list[int],
  max_delay: float,
  targets: tuple[str, ...] = ('all',),
  seed: int | None = None,
) -> KillPoint:
  """A kill point drawn from `seed` (default `kill_seed()`): mid-step (a random delay of at most
  `max_delay` s after one of the `logged` steps) or mid-checkpoint-write (one of the
  `checkpointing` steps, no delay), equally likely, on one of `targets`."""
  seed = kill_seed() if seed is None else seed
  rng = random.Random(seed)
  target = rng.choice(targets)
  if rng.random() < 0.5:
    return KillPoint(
      'logged', rng.choice(logged), round(rng.uniform(0, max_delay), 3), target, seed
    )
  return KillPoint('checkpointing', rng.choice(checkpointing), 0.0, target, seed)


def logged_steps(folder) -> list[int]:
  """Steps of the training records in `folder`/metrics.jsonl so far (a line being written: not
  yet)."""
  try:
    with open(os.path.join(folder, 'metrics.jsonl')) as f:
      lines = [line for line in f.read().split('\n')[:-1] if line.strip()]
  except FileNotFoundError:
    return []
  steps = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if 'loss' in record:
      steps.append(record['step'])
  return steps


def checkpoint_folders(folder) -> tuple[list[int], list[int]]:
  """(finished checkpoint steps, steps being written) under `folder`/checkpoints."""
  try:
    names = os.listdir(os.path.join(folder, 'checkpoints'))
  except FileNotFoundError:
    return [], []
  writing = [int(n.split('.')[0]) for n in names if _TMP in n and n.split('.')[0].isdigit()]
  return sorted(int(n) for n in names if n.isdigit()), sorted(writing)


def reached(point: KillPoint, folder) -> bool:
  if point.event == 'logged':
    return point.step in logged_steps(folder)
  finished, writing = checkpoint_folders(folder)
  return point.step in finished or point.step in writing


@dataclasses.dataclass
class Kill:
  """What a kill hit: the command's exit status (-9: SIGKILLed; 128 + 9: the launcher saw one of
  its processes SIGKILLed) and the run folder at that moment."""

  point: KillPoint | None
  returncode: int
  logged: list[int]
  checkpoints: list[int]
  writing: list[int]

  @property
  def killed(self) -> bool:
    return self.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)


def kill_at(point: KillPoint, command: list[str], folder, **kwargs) -> Kill:
  """Runs `command` and SIGKILLs it at `point` of the run folder `folder` (see `kill_when`)."""
  print(f'kill point: {point} (KJ_KILL_SEED={point.seed} repeats it)')
  kill = kill_when(
    command, lambda: reached(point, folder), folder, point=point, target=point.target, **kwargs
  )
  print(f'at the kill: {kill}')
  return kill


def kill_after_checkpoints(command: list[str], stage_dir, *, count: int = 2, **kwargs) -> Kill:
  """Runs `command` and SIGKILLs it as soon as `stage_dir/checkpoints` holds `count` finished
  checkpoint steps (or when it ends first, which the caller's asserts then catch)."""
  ready = lambda: len(checkpoint_folders(stage_dir)[0]) >= count
  return kill_when(command, ready, stage_dir, **kwargs)


def kill_when(
  command: list[str],
  ready: Callable[[], bool],
  folder,
  *,
  point: KillPoint | None = None,
  target: str = 'all',
  env: dict | None = None,
  timeout: float = 600,
) -> Kill:
  """Starts `command` in its own process group, polls `ready()` every few milliseconds, waits the
  point's delay and SIGKILLs `target` (see `KillPoint`); returns once every process it started
  is gone. A command that ends first is not killed (`Kill.killed` is then False)."""
  proc = subprocess.Popen(
    command,
    cwd=REPO_ROOT,
    env=env or ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  workers = {}
  try:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
      workers.update(_workers(proc.pid))
      time.sleep(0.003)
    if point is not None and point.delay:
      time.sleep(point.delay)
    workers.update(_workers(proc.pid))
    logged = logged_steps(folder)
    checkpoints, writing = checkpoint_folders(folder)
    if target in ('all', 'launcher'):
      _killpg(proc.pid)
    if target == 'all' or target.startswith('process '):
      for index, pid in workers.items():
        if target in ('all', f'process {index}'):
          _killpg(pid)
    returncode = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      _killpg(proc.pid)
      proc.wait()
    end = time.monotonic() + 60
    while any(running(pid) for pid in workers.values()) and time.monotonic() < end:
      time.sleep(0.05)
  assert not any(running(pid) for pid in workers.values()), f'left running: {workers}'
  return Kill(point, returncode, logged, checkpoints, writing)


def _killpg(pid: int) -> None:
  with contextlib.suppress(ProcessLookupError):
    os.killpg(pid, signal.SIGKILL)


def _workers(pid: int) -> dict[int, int]:
  """{JAX process index: pid} of the children of `pid` that are kuaijax.launch processes."""
  out = {}
  try:
    tasks = os.listdir(f'/proc/{pid}/task')
  except FileNotFoundError:
    return out
  for task in tasks:
    try:
      with open(f'/proc/{pid}/task/{task}/children') as f:
        children = [int(c) for c in f.read().split()]
    except FileNotFoundError:
      continue
    for child in children:
      try:
        with open(f'/proc/{child}/environ', 'rb') as f:
          env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
      except (FileNotFoundError, ProcessLookupError, PermissionError):
        continue
      if b'JAX_PROCESS_ID' in env:
        out[int(env[b'JAX_PROCESS_ID'])] = child
  return out


def running(pid: int) -> bool:
  """Whether `pid` exists and is not a zombie (an orphan's zombie may wait for a reaper)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def file_stamps(folder) -> dict:
  """Every file under `folder` -> its modification time (ns): to check a folder was left alone."""
  return {p: p.stat().st_mtime_ns for p in folder.rglob('*') if p.is_file()}


def stage_outcome(stage_dir) -> tuple[list[dict], dict]:
  """(every logged metrics record without the wall-clock tokens/s, the stage's evaluation)."""
  records = [
    {k: v for k, v in r.items() if k != 'tokens_per_s'} for r in read_metrics(str(stage_dir))
  ]
  return records, json.loads((stage_dir / 'stage.json').read_text())['eval']
