"""Executes colab/quickstart.ipynb end to end with a 6-step run and checks what it writes (the
training stage's files in <workdir>/seed_0/lm/)."""

import json
import os
import pathlib
import sys

import jupyter_client.kernelspec
import nbclient
import nbformat
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB_DIR = REPO_ROOT / 'colab'
NOTEBOOK = COLAB_DIR / 'quickstart.ipynb'
STEPS = 6
TASKS = ('code', 'arith', 'copy', 'recall')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='session')
def notebook_data_dir(tmp_path_factory) -> str:
  """$KUAIJAX_DATA_DIR when set, else a data_dir shared by this test session (built on first use)."""
  return os.environ.get('KUAIJAX_DATA_DIR') or str(tmp_path_factory.mktemp('tfds'))


def _kernel_manager(tmp_path) -> jupyter_client.KernelManager:
  """A manager for the `python3` kernel; writes a spec for this interpreter when none is installed."""
  specs = jupyter_client.kernelspec.KernelSpecManager()
  try:
    specs.get_kernel_spec('python3')
  except jupyter_client.kernelspec.NoSuchKernel:
    from ipykernel.kernelspec import write_kernel_spec

    kernels = tmp_path / 'kernels'
    kernels.mkdir()
    write_kernel_spec(
      str(kernels / 'python3'),
      overrides={'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']},
    )
    specs = jupyter_client.kernelspec.KernelSpecManager(kernel_dirs=[str(kernels)])
  return jupyter_client.KernelManager(kernel_name='python3', kernel_spec_manager=specs)


def _error_outputs(nb) -> list[str]:
  errors = []
  for index, cell in enumerate(nb.cells):
    for output in cell.get('outputs', []):
      if output.get('output_type') == 'error':
        errors.append(f'cell {index}: {output["ename"]}: {output["evalue"]}')
  return errors


def execute_notebook(name: str, tmp_path, timeout: int = 900, **env_vars: str):
  """Runs colab/<name> in a fresh kernel with the repository importable and `env_vars` set.

  Returns the executed notebook; fails the test with the error outputs of any cell.
  """
  env = dict(os.environ)
  env.update(
    KUAIJAX_REPO=str(REPO_ROOT),
    # The repository is importable in the kernel, so an install cell has nothing to do.
    PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get('PYTHONPATH')) if p),
    **env_vars,
  )
  env.pop('MPLBACKEND', None)  # the kernel's inline backend shows the figures
  nb = nbformat.read(COLAB_DIR / name, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    km=_kernel_manager(tmp_path),
    timeout=timeout,
    allow_errors=True,
    resources={'metadata': {'path': str(COLAB_DIR)}},
  )
  client.execute(env=env)
  assert not _error_outputs(nb), _error_outputs(nb)
  return nb


def test_quickstart_notebook_runs(tmp_path, notebook_data_dir):
  workdir = tmp_path / 'workdir'
  nb = execute_notebook(
    'quickstart.ipynb',
    tmp_path,
    KUAIJAX_NOTEBOOK_STEPS=str(STEPS),
    KUAIJAX_NOTEBOOK_WORKDIR=str(workdir),
    KUAIJAX_DATA_DIR=notebook_data_dir,
  )
  results = json.loads((workdir / 'results.json').read_text())
  assert results['step'] == STEPS
  for task in TASKS:
    assert results['model'][f'loss/{task}'] > 0, task
    assert results['unigram'][f'loss/{task}'] > 0, task
  assert '| code |' in (workdir / 'results.md').read_text()

  assert results['seeds'] == {'training': [0], 'sampling': []}
  stage = workdir / 'seed_0' / 'lm'  # the pipeline's one stage
  assert json.loads((stage / 'stage.json').read_text())['eval'] == results['model']
  records = [json.loads(line) for line in (stage / 'metrics.jsonl').read_text().splitlines()]
  assert max(r['step'] for r in records) == STEPS
  assert [r['step'] for r in records if 'loss' in r] == list(range(1, STEPS + 1))
  last_eval = [r for r in records if 'eval/loss' in r][-1]
  assert last_eval['step'] == STEPS
  assert all(f'eval/loss/{task}' in last_eval for task in TASKS)

  png = (workdir / 'loss_curves.png').read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 10_000
  assert any(
    o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})
    for cell in nb.cells
    for o in cell.get('outputs', [])
  ), 'the plot was not shown'


def test_capo_notebook_runs(tmp_path, notebook_data_dir):
  workdir = tmp_path / 'workdir'
  nb = execute_notebook(
    'capo.ipynb',
    tmp_path,
    KUAIJAX_NOTEBOOK_STEPS='2',
    KUAIJAX_NOTEBOOK_STAGES='sft_short',
    KUAIJAX_NOTEBOOK_WORKDIR=str(workdir),
    KUAIJAX_DATA_DIR=notebook_data_dir,
  )
  text = ''.join(o.get('text', '') for cell in nb.cells for o in cell.get('outputs', []))
  assert 'chosen' in text and all(
    k in text for k in ('neglect', 'hallucination', 'misunderstanding')
  )
  assert '| SFT, short sessions (1-2 turns) |' in (workdir / 'results.md').read_text()
  assert (workdir / 'accuracy_by_turn.png').read_bytes().startswith(PNG_MAGIC)
  assert any(
    'image/png' in o.get('data', {}) for cell in nb.cells for o in cell.get('outputs', [])
  ), 'the plot was not shown'
