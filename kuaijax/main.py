"""Entry point: `python -m kuaijax.main --config=configs/<paper>/<exp>.py[:args] --workdir=DIR`.

The config names its experiment (`config.experiment`); the module `experiments.<name>` exposes
`run(config, workdir)`. Configs are locked: an override of a key that does not exist, or of the wrong
type, is an error naming the key. An override of a key that the run never reads (it had no effect:
e.g. the shared `train.steps` when every stage sets its own) is reported once the run has finished
(`run_checked`): an error when the run started in an empty workdir in one process, a warning otherwise.
"""

from __future__ import annotations

import importlib
import logging as stdlib_logging
import os
import pkgutil

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from kuaijax import config_reads, parallel


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv: list[str] | None = None):
  """Defines --config (with its --config.<key>=value overrides) and --workdir on `flag_values`.

  Returns their holders. Tests parse command lines through this same definition; `sys_argv` (the
  full argument list) tells ml_collections which override flags to define (default: sys.argv).
  """
  config = config_flags.DEFINE_config_file(
    'config',
    None,
    'Experiment config file.',
    flag_values=flag_values,
    lock_config=True,
    sys_argv=sys_argv,
  )
  workdir = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and results.', flag_values=flag_values
  )
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)
  return config, workdir


_CONFIG, _WORKDIR = define_flags()


def available_experiments() -> list[str]:
  import experiments

  return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__))


def run_experiment(config, workdir: str):
  """Imports `experiments.<config.experiment>` and calls its `run(config, workdir)`."""
  name = config.experiment
  if name not in available_experiments():
    raise ValueError(f'config.experiment={name!r} is unknown; available: {available_experiments()}')
  module = importlib.import_module(f'experiments.{name}')
  return module.run(config, os.path.abspath(os.path.expanduser(workdir)))


class UnreadOverridesError(ValueError):
  """Command-line overrides of config leaves that the run never read."""


def run_checked(config, workdir: str, overrides) -> dict:
  """`run_experiment`, then the check that the run read every leaf in `overrides` (the
  `--config.<path>=value` overrides: {path: value}).

  Reads are recorded by `config_reads.track_reads`. An override that was never read is an
  `UnreadOverridesError` naming it when the verdict is certain: the run started in an empty (or
  new) workdir, so it skipped and resumed nothing, and ran in one process. Otherwise (a finished
  stage that was skipped read its fields in an earlier run; another process may read what this
  one does not) it is a warning naming it. The run's results are written either way.
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  fresh = not os.path.isdir(path) or not os.listdir(path)
  with config_reads.track_reads(config) as tracker:
    results = run_experiment(config, workdir)
  unread = config_reads.unread_overrides(tracker, overrides)
  if unread:
    names = '; '.join(f'--config.{p}={overrides[p]!r}' for p in unread)
    message = f'the run never read these overridden config fields (they had no effect): {names}'
    if fresh and jax.process_count() == 1:
      raise UnreadOverridesError(message)
    why = 'the workdir held an earlier run' if not fresh else f'{jax.process_count()} processes'
    logging.warning('%s (a warning, not an error: %s)', message, why)
  return results


class _QuietLibraries(stdlib_logging.Filter):
  """Drops the INFO chatter of orbax, tfds and the XLA bridge; warnings and errors still show."""

  _NOISY = ('orbax', 'tensorflow_datasets', 'xla_bridge', 'etils')

  def filter(self, record):
    return record.levelno >= stdlib_logging.WARNING or not any(
      n in record.pathname for n in self._NOISY
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  parallel.maybe_initialize_distributed()
  logging.info('experiment %s -> %s', _CONFIG.value.experiment, _WORKDIR.value)
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  run_checked(_CONFIG.value, _WORKDIR.value, overrides)


if __name__ == '__main__':
  app.run(main)
