"""The HF parity table's script (experiments/hf_parity.py) end to end at tiny size: one family, both
dtypes, the table of experiments/hf/README.md with its numbers in their expected ranges."""

import json
import os

import pytest

from experiments import hf_parity
from kuaijax.config_lib import load_config
from kuaijax.hf import families
from kuaijax.main import run_experiment
from tests.conftest import REPO_ROOT


def test_every_family_is_described():
  assert set(hf_parity.FEATURES) == set(families.FAMILIES)
  config = load_config(os.path.join(REPO_ROOT, 'configs/hf/parity.py'))
  assert set(config.parity.families) == set(families.FAMILIES)
  assert list(config.parity.seeds) == [0, 1, 2]


def test_parity_table_runs(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  config = load_config(os.path.join(REPO_ROOT, 'configs/hf/parity.py') + ':runlocal')
  run_experiment(config, str(tmp_path))
  results = json.loads((tmp_path / 'results.json').read_text())
  assert list(results['families']) == ['llama'] and list(results['families']['llama']) == ['0']
  f32, bf16 = (results['worst']['llama'][d] for d in ('float32', 'bfloat16'))
  # float32: the same function as transformers up to float32 rounding, the same greedy tokens.
  assert f32['max_abs_logit_diff'] < 1e-5 and f32['mean_kl'] < 1e-10
  assert f32['top1_equal'] == f32['greedy_equal'] == 1.0
  # bfloat16 (eps 2^-7): visibly rounded, still the same distribution to within ~1e-3 nats.
  assert 1e-3 < bf16['max_abs_logit_diff'] < 0.5 and bf16['mean_kl'] < 1e-2
  assert bf16['top1_equal'] >= 0.75 and 0.0 <= bf16['greedy_equal'] <= 1.0
  assert results['seeds'] == {'training': [], 'sampling': [], 'weights_and_tokens': [0]}
  table = (tmp_path / 'results.md').read_text()
  assert '| llama (Llama-3 RoPE scaling) |' in table
  assert table.count('|---|') == 1 and 'bfloat16: mean KL' in table
