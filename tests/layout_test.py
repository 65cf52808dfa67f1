"""The house rules of the layout, read from the code: no package-level import cycle inside kuaijax,
no experiment imports another, no config loads another by path, the top level is the layout."""

import ast
import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT

TOP_LEVEL = {
  '.ci',
  '.gitignore',
  '.ruff.toml',
  'README.md',
  'colab',
  'configs',
  'experiments',
  'kuaijax',
  'pallas_kernels',
  'setup.py',
  'tests',
}


def _python_files(folder: str):
  for root, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
    for name in files:
      if name.endswith('.py'):
        yield os.path.join(root, name)


def _imported_modules(path: str) -> set[str]:
  """Every module an import statement of the file names (from-imports: module and module.name)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module)
      out.update(f'{node.module}.{a.name}' for a in node.names)
  return out


def package_graph() -> dict[str, set[str]]:
  """kuaijax's top-level packages and modules -> the others they import."""
  graph: dict[str, set[str]] = {}
  kuaijax = os.path.join(REPO_ROOT, 'kuaijax')
  units = {n.removesuffix('.py') for n in os.listdir(kuaijax) if not n.startswith('_')}
  for path in _python_files('kuaijax'):
    parts = os.path.relpath(path, kuaijax).split(os.sep)
    unit = parts[0].removesuffix('.py')
    if unit.startswith('_'):
      continue
    for module in _imported_modules(path):
      names = module.split('.')
      if names[0] == 'kuaijax' and len(names) > 1 and names[1] in units and names[1] != unit:
        graph.setdefault(unit, set()).add(names[1])
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle of the graph as a path [a, b, ..., a], or [] when there is none."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return [*stack[stack.index(nxt) :], nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    stack.pop()
    state[node] = 2
    return []

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return []


def test_find_cycle_finds_one_and_only_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_no_package_level_import_cycle_inside_kuaijax():
  graph = package_graph()
  assert 'stages' in graph and 'methods' in graph['stages']  # the graph is read at all
  assert find_cycle(graph) == []


def test_no_experiment_imports_another():
  for path in _python_files('experiments'):
    own = os.path.basename(path).removesuffix('.py')
    others = {m for m in _imported_modules(path) if m.split('.')[0] == 'experiments'}
    assert not {m for m in others if m.split('.')[1:2] != [own]}, path


@pytest.mark.parametrize('marker', ['spec_from_file_location', 'load_config(', 'exec_module'])
def test_no_config_loads_another_by_path(marker):
  for path in _python_files('configs'):
    with open(path) as f:
      assert marker not in f.read(), f'{path} uses {marker}'


def test_top_level_is_the_layout():
  """What git tracks at the top level (build and test caches are not the project's)."""
  listed = subprocess.run(
    ['git', 'ls-files'], cwd=REPO_ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  assert len(listed) > 100
  assert {path.split('/')[0] for path in listed} == TOP_LEVEL
