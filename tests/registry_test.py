"""Registries find components by name without central lists: a home package's modules, or the
module a dotted name points to, are imported on a lookup miss."""

import sys
import textwrap

import jax
import pytest
from flax import nnx

from kuaijax.evals import registry as eval_registry
from kuaijax.models.transformer import Transformer, TransformerConfig


def _write(root, files: dict[str, str]):
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def importable(tmp_path, monkeypatch):
  """tmp_path on sys.path; the modules imported from it are forgotten afterwards."""
  monkeypatch.syspath_prepend(str(tmp_path))
  before = set(sys.modules)
  yield tmp_path
  for name in set(sys.modules) - before:
    if str(tmp_path) in (getattr(sys.modules[name], '__file__', None) or ''):
      del sys.modules[name]


def test_home_package_modules_are_imported_once_on_a_miss(importable):
  _write(
    importable,
    {
      'kj_home/__init__.py': """
        from kuaijax.registry import Registry
        THINGS = Registry('thing', package='kj_home')
        IMPORTS = []
      """,
      'kj_home/one.py': """
        from kj_home import IMPORTS, THINGS
        IMPORTS.append('one')
        THINGS.register('one')(1)
      """,
      'kj_home/two.py': """
        from kj_home import IMPORTS, THINGS
        IMPORTS.append('two')
        THINGS.register('two')(2)
      """,
    },
  )
  import kj_home

  assert dict(kj_home.THINGS) == {} and kj_home.IMPORTS == []
  assert kj_home.THINGS.lookup('two') == 2
  assert sorted(kj_home.IMPORTS) == ['one', 'two']
  with pytest.raises(ValueError, match=r"thing 'three' is not one of \['one', 'two'\]"):
    kj_home.THINGS.lookup('three')
  assert sorted(kj_home.IMPORTS) == ['one', 'two']  # imported once
  with pytest.raises(ValueError, match="cannot import module 'kj_nowhere'"):
    kj_home.THINGS.lookup('kj_nowhere.thing')


def test_an_evaluator_in_a_user_module_is_found_by_its_dotted_name(importable):
  kind = 'kj_lab.evals.param_count'
  _write(
    importable,
    {
      'kj_lab/__init__.py': '',
      'kj_lab/evals.py': """
        import jax

        from kuaijax.evals.base import Evaluator
        from kuaijax.evals.registry import register_evaluator


        class ParamCount(Evaluator):
          def __init__(self, scale):
            self.scale = scale

          def evaluate(self, graphdef, params, step=None):
            return {'param_count': self.scale * sum(x.size for x in jax.tree.leaves(params))}


        @register_evaluator('kj_lab.evals.param_count')
        def build(options, ctx):
          return ParamCount(options['scale'])
      """,
    },
  )
  assert kind not in eval_registry.EVALUATORS and 'kj_lab.evals' not in sys.modules
  try:
    built = eval_registry.build_evaluators(
      {'count': {'type': kind, 'scale': 2}}, eval_registry.EvalContext(tokenizer=None)
    )
    config = TransformerConfig(
      vocab_size=32, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=16
    )
    model = Transformer(config, rngs=nnx.Rngs(0))
    size = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert built(model) == {'param_count': 2 * size}
  finally:
    eval_registry.EVALUATORS.pop(kind, None)
  with pytest.raises(ValueError, match=r"evaluator 'no_such_eval' is not one of \[.*'lm_loss'"):
    eval_registry.build_evaluators({'x': {'type': 'no_such_eval'}}, None)
