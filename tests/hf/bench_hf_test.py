"""The HF interop benchmark runs end to end at tiny size (numbers are not asserted: no timing
thresholds in tests; only that both loaders read the whole checkpoint)."""

import json
import os

import pytest

pytest.importorskip('safetensors')

from kuaijax import main  # noqa: E402
from kuaijax.config_lib import load_config  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402


def test_decode_sides_produce_the_same_tokens(tmp_path):
  """The benchmark's decoding comparison on its runlocal model at batch 2 (the tiny version of the
  slow run below, without the import part): kuaijax `sampling.generate` and transformers
  `generate` produce the same greedy tokens, so the speed-up compares equal work."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from experiments import bench_hf

  bench = load_config(os.path.join(REPO_ROOT, 'configs/hf/bench.py') + ':runlocal').bench
  model = bench.decode_model.to_dict()
  # One call of each side, no warm-up: only the tokens matter here.
  rows, _ = bench_hf.measure_decode(
    str(tmp_path), model, (2,), bench.new_tokens, bench.prompt_len, rounds=1, warmup=0
  )
  assert [(r['batch'], r['same_tokens_fraction']) for r in rows] == [(2, 1.0)]


@pytest.mark.parametrize(
  'arg', ['runlocal,decode=false', pytest.param('runlocal', marks=pytest.mark.slow)]
)
def test_bench_hf_runs(tmp_path, arg):
  if arg == 'runlocal':
    pytest.importorskip('torch')
    pytest.importorskip('transformers')
  config = load_config(os.path.join(REPO_ROOT, 'configs/hf/bench.py') + ':' + arg)
  main.run_experiment(config, str(tmp_path))
  results = json.loads((tmp_path / 'results.json').read_text())
  size = results['checkpoint_bytes']
  assert results['import_']['safetensors']['bytes'] == size
  assert results['import_']['kuaijax']['bytes'] == size
  if arg == 'runlocal':
    assert [r['same_tokens_fraction'] for r in results['decode']] == [1.0, 1.0]
  assert (tmp_path / 'bench_hf.png').exists() and (tmp_path / 'results.md').exists()
