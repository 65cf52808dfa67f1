"""Runs one kuaijax job as several local processes that talk through JAX's CPU collectives (gloo).

  python -m kuaijax.launch --processes 2 --devices_per_process 4 -- \\
      --config=configs/lm/mixture.py:runlocal --workdir=/tmp/kj_lm_2proc

Process i gets the environment a pod or cluster would give it: JAX_COORDINATOR_ADDRESS (a free
local port), JAX_NUM_PROCESSES, JAX_PROCESS_ID and its own simulated CPU devices; `kuaijax.main`
then calls `jax.distributed.initialize()` through `parallel.maybe_initialize_distributed`, the same
code path as TPU pods, SLURM and hand-set `JAX_COORDINATOR_ADDRESS` jobs. The launcher exits with
the first non-zero exit status of any process after stopping the others, so no process outlives a
failure; on Linux the processes also get SIGTERM when the launcher itself dies (even by SIGKILL). Process 0 writes the workdir's files (config, metrics, results); orbax checkpoints are
written collectively, each process its shards.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from kuaijax.parallel import INIT_TIMEOUT_ENV

_DEVICE_FLAG = '--xla_force_host_platform_device_count'
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
  """A TCP port that was free a moment ago (the coordinator binds it right after)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(
  base: dict, *, index: int, processes: int, devices: int, address: str, timeout_s: int
) -> dict:
  """The environment of process `index`: coordinator contract plus `devices` CPU devices."""
  flags = [f for f in base.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_FLAG)]
  return {
    **base,
    'JAX_COORDINATOR_ADDRESS': address,
    'JAX_NUM_PROCESSES': str(processes),
    'JAX_PROCESS_ID': str(index),
    'JAX_PLATFORMS': 'cpu',
    'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
    'XLA_FLAGS': ' '.join([*flags, f'{_DEVICE_FLAG}={devices}']),
    INIT_TIMEOUT_ENV: str(timeout_s),
  }


def _die_with_parent() -> None:
  """In the child before exec: SIGKILL it when the launcher dies, even by SIGKILL (Linux only).

  SIGKILL, not SIGTERM: `jax.distributed.initialize` installs a preemption handler that catches
  SIGTERM, so a worker told to terminate would run on, writing the workdir, with no launcher.
  """
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
  """SIGTERM every running process group, then SIGKILL what is left after `grace_s`."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    for p in procs:
      if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(p.pid, sig)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      time.sleep(0.05)


def launch(
  argv: list[str],
  *,
  processes: int,
  devices_per_process: int = 1,
  timeout_s: int = 60,
  module: str = 'kuaijax.main',
  port: int = 0,
) -> int:
  """Starts `processes` copies of `python -m module argv...`; returns the first non-zero status.

  Returns 0 when every process exits 0. A process killed by a signal counts as status 128 + signal.
  """
  if processes < 1 or devices_per_process < 1:
    raise ValueError(
      f'--processes={processes} and --devices_per_process={devices_per_process} must be >= 1'
    )
  address = f'127.0.0.1:{port or free_port()}'
  procs = []
  try:
    for i in range(processes):
      env = process_env(
        dict(os.environ),
        index=i,
        processes=processes,
        devices=devices_per_process,
        address=address,
        timeout_s=timeout_s,
      )
      procs.append(
        subprocess.Popen(
          [sys.executable, '-m', module, *argv],
          env=env,
          start_new_session=True,
          preexec_fn=_die_with_parent,
        )
      )
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        code = failed[0]
        return 128 - code if code < 0 else code
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.1)
  finally:
    _stop(procs)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits `launcher flags -- program flags`; validates the launcher's own flags."""
  if '--' not in argv:
    raise SystemExit('usage: python -m kuaijax.launch --processes N [...] -- <kuaijax.main args>')
  split = argv.index('--')
  parser = argparse.ArgumentParser(prog='python -m kuaijax.launch')
  parser.add_argument('--processes', type=int, required=True, help='number of processes')
  group = parser.add_mutually_exclusive_group()
  group.add_argument('--devices_per_process', type=int, default=0, help='CPU devices each (1)')
  group.add_argument('--devices', type=int, default=0, help='total CPU devices, split evenly')
  parser.add_argument('--timeout', type=int, default=60, help='seconds to reach the coordinator')
  parser.add_argument('--port', type=int, default=0, help='coordinator port (0: a free one)')
  parser.add_argument('--module', default='kuaijax.main', help='python module each process runs')
  args = parser.parse_args(argv[:split])
  if args.processes < 1:
    parser.error(f'--processes={args.processes} must be >= 1')
  if args.devices:
    if args.devices % args.processes:
      parser.error(f'--devices={args.devices} is not divisible by --processes={args.processes}')
    args.devices_per_process = args.devices // args.processes
  args.devices_per_process = args.devices_per_process or 1
  return args, argv[split + 1 :]


def _exit_on_sigterm(signum, frame):
  del frame
  sys.exit(128 + signum)  # runs launch()'s cleanup, which stops the processes


def main(argv: list[str] | None = None) -> int:
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  args, program_argv = parse_args(sys.argv[1:] if argv is None else argv)
  return launch(
    program_argv,
    processes=args.processes,
    devices_per_process=args.devices_per_process,
    timeout_s=args.timeout,
    module=args.module,
    port=args.port,
  )


if __name__ == '__main__':
  sys.exit(main())
