"""Components chosen by name from config: one small registry type shared by methods, stage types,
evaluators, tasks and chat templates."""

from __future__ import annotations


class Registry(dict):
  """Name -> component of one kind: `@REG.register('name')` adds one, `REG.lookup(name)` finds it
  (a clear error listing the known names otherwise)."""

  def __init__(self, kind: str, items: dict | None = None):
    super().__init__(items or {})
    self.kind = kind

  def register(self, name: str):
    def add(component):
      if name in self:
        raise ValueError(f'{self.kind} {name!r} is already registered')
      self[name] = component
      return component

    return add

  def lookup(self, name: str):
    if name not in self:
      raise ValueError(f'{self.kind} {name!r} is not one of {sorted(self)}')
    return self[name]
