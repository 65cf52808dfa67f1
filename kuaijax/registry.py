"""Components chosen by name from config: one small registry type shared by methods, stage types,
evaluators, tasks and chat templates."""

from __future__ import annotations

import importlib
import pkgutil


class Registry(dict):
  """Name -> component of one kind: `@REG.register('name')` adds one, `REG.lookup(name)` finds it
  (a clear error listing the known names otherwise).

  With a home `package`, components register themselves where they are defined and no central
  list imports them: a lookup miss imports, for a dotted name 'mylab.evals.score', the module
  'mylab.evals', else every module of the home package once, then looks again.
  """

  def __init__(self, kind: str, items: dict | None = None, *, package: str = ''):
    super().__init__(items or {})
    self.kind = kind
    self.package = package
    self._imported_package = False

  def register(self, name: str):
    def add(component):
      if name in self:
        raise ValueError(f'{self.kind} {name!r} is already registered')
      self[name] = component
      return component

    return add

  def _import_for(self, name: str) -> None:
    module, dot, _ = name.rpartition('.')
    if dot:
      try:
        importlib.import_module(module)
      except ImportError as e:
        raise ValueError(f'{self.kind} {name!r}: cannot import module {module!r} ({e})') from e
    elif self.package and not self._imported_package:
      self._imported_package = True
      home = importlib.import_module(self.package)
      for info in pkgutil.iter_modules(home.__path__):
        importlib.import_module(f'{self.package}.{info.name}')

  def lookup(self, name: str):
    if name not in self:
      self._import_for(name)
    if name not in self:
      raise ValueError(f'{self.kind} {name!r} is not one of {sorted(self)}')
    return self[name]
