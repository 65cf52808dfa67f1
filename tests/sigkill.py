"""Real kills for resume tests: run `python -m kuaijax.main` as a subprocess, SIGKILL it once a
stage folder holds checkpoints, and read back what a stage logged and evaluated."""

import json
import os
import signal
import subprocess
import time

from kuaijax.train.metrics import read_metrics
from tests.conftest import REPO_ROOT

ENV = {**os.environ, 'XLA_FLAGS': ''}  # one CPU device, as a user's plain command


def run(command: list[str]) -> None:
  """Runs `command` to the end in the repository root (an error if it fails)."""
  subprocess.run(command, cwd=REPO_ROOT, env=ENV, check=True, capture_output=True)


def kill_after_checkpoints(command: list[str], stage_dir, *, count: int = 2, timeout: float = 600):
  """Starts `command` and SIGKILLs it as soon as `stage_dir/checkpoints` holds `count` finished
  checkpoint steps (or when it ends first, which the caller's asserts then catch)."""
  proc = subprocess.Popen(
    command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  ckpt_dir = stage_dir / 'checkpoints'
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if (
      len([d for d in (os.listdir(ckpt_dir) if ckpt_dir.exists() else []) if d.isdigit()]) >= count
    ):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def file_stamps(folder) -> dict:
  """Every file under `folder` -> its modification time (ns): to check a folder was left alone."""
  return {p: p.stat().st_mtime_ns for p in folder.rglob('*') if p.is_file()}


def stage_outcome(stage_dir) -> tuple[list[dict], dict]:
  """(every logged metrics record without the wall-clock tokens/s, the stage's evaluation)."""
  records = [
    {k: v for k, v in r.items() if k != 'tokens_per_s'} for r in read_metrics(str(stage_dir))
  ]
  return records, json.loads((stage_dir / 'stage.json').read_text())['eval']
