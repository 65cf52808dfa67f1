"""Every leaf of every config can be set from the command line, through kuaijax.main's own flags.

ml_collections can only override a field whose type it knows: a leaf whose default is None (type
NoneType) cannot be set at all, so configs use typed placeholders or sentinels instead. The configs
are found at test time, so configs added later are covered too.
"""

import glob
import os
import pathlib

import ml_collections
import pytest
from absl import flags
from ml_collections.config_flags import config_path

from kuaijax import main
from kuaijax.config_lib import load_config
from tests.conftest import REPO_ROOT

CONFIG_FILES = sorted(
  os.path.relpath(path, REPO_ROOT)
  for path in glob.glob(os.path.join(REPO_ROOT, 'configs', '**', '*.py'), recursive=True)
  if os.path.basename(path) != '__init__.py'
)
# Configs that cannot be built without an argument: the argument the test gives them.
REQUIRED_ARGS = {'configs/hf/eval.py': 'path=/models/example'}


def _leaves(config: ml_collections.ConfigDict, prefix: str = ''):
  """(dotted path, field type, value) of every leaf."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', config.get_type(key), value


def _other_value(path: str, field_type: type, value):
  """A value of the leaf's type that differs from `value`."""
  if field_type is bool:
    return not value
  if field_type is int:
    return 3 if value is None else value + 1
  if field_type is float:
    return 0.5 if value is None else 2 * value + 0.5
  if field_type is str:
    return 'x' if value is None else value + 'x'
  if field_type is tuple:
    return value[::-1] if len(value) > 1 else (*value, *value) if value else ('x',)
  raise AssertionError(f'config leaf {path} has type {field_type.__name__}: not settable by a flag')


def _flag_text(value) -> str:
  return repr(value) if isinstance(value, tuple) else str(value)


def parse_command_line(config_spec: str, overrides: dict):
  """The config kuaijax.main would get from `--config=<spec> --config.<key>=<value> ...`."""
  argv = [
    'kuaijax.main',
    f'--config={config_spec}',
    '--workdir=/tmp/unused',
    *(f'--config.{key}={_flag_text(value)}' for key, value in overrides.items()),
  ]
  flag_values = flags.FlagValues()
  config_flag, _ = main.define_flags(flag_values, sys_argv=argv)
  flag_values(argv)
  return config_flag.value


def test_config_files_are_found():
  assert {'configs/lm/mixture.py', 'configs/topp_moe/compare.py'} <= set(CONFIG_FILES)


@pytest.mark.parametrize('arg', ['', 'runlocal'], ids=['full', 'runlocal'])
@pytest.mark.parametrize('path', CONFIG_FILES)
def test_every_leaf_can_be_overridden(path, arg):
  args = ','.join(a for a in (arg, REQUIRED_ARGS.get(path, '')) if a)
  spec = os.path.join(REPO_ROOT, path) + (f':{args}' if args else '')
  config = parse_command_line(spec, {})
  leaves = list(_leaves(config))
  assert leaves, f'{path}{arg} has no fields'
  new = {p: _other_value(p, field_type, value) for p, field_type, value in leaves}
  overridden = parse_command_line(spec, new)
  for p, expected in new.items():
    assert config_path.get_value(p, overridden) == expected, p


def test_topp_moe_k_max_is_settable_and_zero_means_no_cap():
  from kuaijax.models.moe import MoEConfig

  spec = os.path.join(REPO_ROOT, 'configs/topp_moe/compare.py:runlocal')
  layer = lambda config: MoEConfig.from_options(config.models.topp.mlp_options)
  config = parse_command_line(spec, {})
  assert config.models.topp.mlp_options.k_max == 0  # uncapped Top-P, the paper's routing
  uncapped = layer(config)
  assert uncapped.k_max == 0 and uncapped.slots == uncapped.num_experts == 8
  capped = layer(parse_command_line(spec, {'models.topp.mlp_options.k_max': 3}))
  assert capped.k_max == 3 and capped.slots == 3
  assert layer(parse_command_line(spec, {'models.topp.mlp_options.k_max': 8})).k_max == 8


@pytest.mark.parametrize(
  'path', ['configs/lm/mixture.py', 'configs/topp_moe/compare.py', 'configs/pcformer/lm.py']
)
def test_lm_pipelines_take_seeds_and_name_their_roles(path):
  spec = os.path.join(REPO_ROOT, path) + ':runlocal'
  assert parse_command_line(spec, {}).seeds == (0,)
  config = parse_command_line(spec + ',seeds=0+1+2', {})
  assert config.seeds == (0, 1, 2)
  for name in config.stages.split(','):
    block = config.stage[name]
    assert block.type == 'pretrain' and block.model in config.models
  with pytest.raises(ValueError, match="seeds='1\\+1': expected distinct ints"):
    load_config(spec + ',seeds=1+1')
  assert not hasattr(config, 'model') and 'run_variants' not in config


def test_lm_configs_load_no_other_config_file():
  """Shared parts come from kuaijax (config_lib, lm_configs), never from another config's path."""
  for path in (
    'lm/mixture.py',
    'lm/lr_sweep.py',
    'topp_moe/compare.py',
    'pcformer/lm.py',
    'scaling/dense_vs_moe.py',
  ):
    text = pathlib.Path(REPO_ROOT, 'configs', path).read_text()
    assert 'load_config(' not in text and 'spec_from_file_location' not in text, path
