"""Which config leaves a run reads: the check that every `--config.<leaf>=...` override had an effect.

`track_reads(config)` records the leaves read while it is active; `unread_overrides(tracker,
overrides)` lists the overridden leaves the run never read (`kuaijax.main.run_checked`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import threading
from collections.abc import Callable

import ml_collections

# While `track_reads(config)` is active, the ConfigDict class records every leaf that is read, by its
# path in `config`. A leaf's path travels with its value through the ways a run copies configs:
# `ConfigDict(config.to_dict())`, `ConfigDict(node)`, `node.update(other.to_dict())` (the updated
# leaves then belong to `other`: a stage block's `train.steps` shadows the shared `train.steps`),
# `copy_and_resolve_references`, deep copies. Reading a copy's leaf reads the original leaf; a
# FieldReference shared by several leaves (or derived from one) makes a read of one a read of all it
# is computed from. A `to_dict()` result that is not copied into a ConfigDict counts as reading every
# leaf in it (its reads are invisible); a key removed from it before the copy counts as read.
# Printing, comparing and JSON-serialising a config (config.json) read nothing.

_ORIGIN = '_kuaijax_leaf_paths'  # attribute of a ConfigDict: {leaf key: its path in the config}
# to_dict() results remembered at most (older ones count as read, so memory stays bounded)
_MAX_EXPORTS = 4096
_ACTIVE: ReadTracker | None = None
_PATCHED: dict = {}


def _path(prefix: str, key) -> str:
  return f'{prefix}.{key}' if prefix else str(key)


def _resolved(field):
  if isinstance(field, ml_collections.FieldReference):
    try:
      return field.get()
    except Exception:  # an empty required reference
      return None
  return field


def _is_node(field) -> bool:
  return isinstance(_resolved(field), ml_collections.ConfigDict)


def _origins(cd) -> dict:
  return cd.__dict__.get(_ORIGIN) or {}


def _set_origins(cd, origins: dict) -> None:
  object.__setattr__(cd, _ORIGIN, origins)


def _walk(cd, prefix: str = '', seen=None):
  """(node, path) for `cd` and every sub-config in it (each node once)."""
  seen = set() if seen is None else seen
  if id(cd) in seen:
    return
  seen.add(id(cd))
  yield cd, prefix
  for key, field in cd._fields.items():
    value = _resolved(field)
    if isinstance(value, ml_collections.ConfigDict):
      yield from _walk(value, _path(prefix, key), seen)


def _reference_sources(ref, out: dict) -> dict:
  """id -> FieldReference: `ref` and every reference its value is computed from."""
  if id(ref) not in out:
    out[id(ref)] = ref
    if isinstance(ref._value, ml_collections.FieldReference):
      _reference_sources(ref._value, out)
    for op in ref._ops:
      for arg in op.args:
        if isinstance(arg, ml_collections.FieldReference):
          _reference_sources(arg, out)
  return out


class ReadTracker:
  """The leaves of a config read while `track_reads(config)` was active (`reads`, by path)."""

  def __init__(self, config):
    self.reads: set[str] = set()
    self.leaves: list[str] = []
    self._exports: dict[int, list] = {}  # id -> [dict, {key: leaf path}, copied into a ConfigDict]
    self._local = threading.local()
    held = collections.defaultdict(set)  # id(FieldReference) -> paths holding it
    sources = {}  # path -> ids of the references its value is computed from
    for node, prefix in _walk(config):
      origins = {}
      for key, field in node._fields.items():
        if not _is_node(field):
          path = origins[key] = _path(prefix, key)
          self.leaves.append(path)
          if isinstance(field, ml_collections.FieldReference):
            held[id(field)].add(path)
            sources[path] = _reference_sources(field, {})
      _set_origins(node, origins)
    self._readers = collections.defaultdict(set)  # path -> paths whose value is computed from it
    for path, refs in sources.items():
      for ref_id in refs:
        for source in held.get(ref_id, ()):
          self._readers[source].add(path)

  @contextlib.contextmanager
  def quiet(self):
    """ml_collections' own internals read nothing (to_dict, update, printing...)."""
    self._local.depth = getattr(self._local, 'depth', 0) + 1
    try:
      yield
    finally:
      self._local.depth -= 1

  @property
  def is_quiet(self) -> bool:
    return getattr(self._local, 'depth', 0) > 0

  def read(self, cd, key) -> None:
    path = _origins(cd).get(key)
    if path is not None:
      self.reads.add(path)

  def was_read(self, path: str) -> bool:
    """Whether the leaf `path` (or a leaf whose value is computed from it) was read."""
    return bool(({path} | self._readers.get(path, set())) & self.reads)

  def exported(self, cd, out: dict, seen=None) -> None:
    """Remembers the leaf paths of `cd.to_dict()`'s result `out` (nested dicts separately)."""
    seen = set() if seen is None else seen
    if id(out) in seen:
      return
    seen.add(id(out))
    origins, leaves = _origins(cd), {}
    for key, value in out.items():
      field = _resolved(cd._fields.get(key))
      if isinstance(field, ml_collections.ConfigDict) and isinstance(value, dict):
        self.exported(field, value, seen)
      elif key in origins:
        leaves[key] = origins[key]
    if len(self._exports) >= _MAX_EXPORTS:
      self._settle(self._exports.pop(next(iter(self._exports))))
    self._exports[id(out)] = [out, leaves, False]

  def copied(self, source) -> dict:
    """{key: leaf path} of a mapping being copied into a ConfigDict (no read of its leaves)."""
    if isinstance(source, ml_collections.ConfigDict):
      return dict(_origins(source))
    entry = self._exports.get(id(source))
    if entry is None or entry[0] is not source:
      return {}
    entry[2] = True
    present = {}
    for key, path in entry[1].items():
      if key in source:
        present[key] = path
      else:  # taken out of the dict (e.g. popped) before the copy: used by whoever took it
        self.reads.add(path)
    return present

  def read_everything(self, source) -> None:
    """Every leaf of `source` (a ConfigDict or a to_dict() result) counts as read."""
    if isinstance(source, ml_collections.ConfigDict):
      for node, _ in _walk(source):
        self.reads.update(_origins(node).values())
    elif isinstance(source, dict):
      self.reads.update(self.copied(source).values())
      for value in source.values():
        self.read_everything(value)

  def _settle(self, entry) -> None:
    if not entry[2]:  # never copied into a ConfigDict: used as a dict, every leaf read
      self.reads.update(entry[1].values())

  def close(self) -> None:
    for entry in self._exports.values():
      self._settle(entry)
    self._exports.clear()


def _recording(method):
  def getitem(self, key):
    value = method(self, key)
    tracker = _ACTIVE
    if (
      tracker is not None
      and not tracker.is_quiet
      and not isinstance(value, ml_collections.ConfigDict)
    ):
      tracker.read(self, key)
    return value

  return getitem


def _forgetting(method):
  def setitem(self, key, value):
    method(self, key, value)
    tracker = _ACTIVE
    if tracker is not None and not tracker.is_quiet:
      _origins(self).pop(key, None)  # set by the code: no longer the config's leaf

  return setitem


def _exporting(method):
  def to_dict(self, visit_map=None, preserve_field_references=False):
    tracker = _ACTIVE
    if tracker is None or tracker.is_quiet:
      return method(self, visit_map, preserve_field_references)
    with tracker.quiet():
      out = method(self, visit_map, preserve_field_references)
    if preserve_field_references:
      tracker.read_everything(self)
    else:
      tracker.exported(self, out)
    return out

  return to_dict


def _filling(function):
  def fill_seed(seed, initial_dictionary, visit_map=None):
    tracker = _ACTIVE
    if tracker is None:
      return function(seed, initial_dictionary, visit_map)
    with tracker.quiet():
      function(seed, initial_dictionary, visit_map)
    origins = tracker.copied(initial_dictionary)
    fields = seed._fields
    _set_origins(
      seed, {k: p for k, p in origins.items() if k in fields and not _is_node(fields[k])}
    )

  return fill_seed


def _updating(method):
  def update(self, *other, **kwargs):
    tracker = _ACTIVE
    if tracker is None:
      return method(self, *other, **kwargs)
    with tracker.quiet():
      method(self, *other, **kwargs)
    origins = self.__dict__.get(_ORIGIN)
    if origins is None:
      origins = {}
      _set_origins(self, origins)
    for source in (*other, kwargs):
      source_origins = tracker.copied(source)
      for key in list(source.keys()):
        if key in self._fields and _is_node(self._fields[key]):
          continue  # a sub-config: updated by its own update()
        if key in source_origins:
          origins[key] = source_origins[key]
        else:
          origins.pop(key, None)

  return update


def _copying(method):
  def copy_and_resolve_references(self, visit_map=None):
    tracker = _ACTIVE
    if tracker is None:
      return method(self, visit_map)
    with tracker.quiet():
      out = method(self, visit_map)
    _set_origins(out, dict(_origins(self)))
    return out

  return copy_and_resolve_references


def _restoring(method):
  def setstate(self, state):
    method(self, state)
    if _ORIGIN in state:
      _set_origins(self, dict(state[_ORIGIN]))

  return setstate


def _referencing(method):
  def get_ref(self, key):
    tracker = _ACTIVE
    if tracker is None:
      return method(self, key)
    if not tracker.is_quiet:
      tracker.read(self, key)  # whoever holds the reference may read it: counts as read
    with tracker.quiet():
      return method(self, key)

  return get_ref


def _freezing(method):
  def init(self, initial_dictionary=None, *args, **kwargs):
    tracker = _ACTIVE
    if tracker is not None and initial_dictionary is not None:
      tracker.read_everything(initial_dictionary)  # a frozen copy's reads are not tracked
    return method(self, initial_dictionary, *args, **kwargs)

  return init


def _quietly(method):
  def wrapper(self, *args, **kwargs):
    tracker = _ACTIVE
    if tracker is None:
      return method(self, *args, **kwargs)
    with tracker.quiet():
      return method(self, *args, **kwargs)

  return wrapper


def _patches() -> list[tuple[object, str, Callable]]:
  from ml_collections.config_dict import config_dict as module

  cd, frozen = module.ConfigDict, module.FrozenConfigDict
  quiet_methods = (
    '__repr__',
    '__str__',
    '__eq__',
    'eq_as_configdict',
    'to_yaml',
    'to_json',
    'to_json_best_effort',
  )
  return [
    (cd, '__getitem__', _recording),
    (cd, '__setitem__', _forgetting),
    (cd, 'to_dict', _exporting),
    (cd, 'update', _updating),
    (cd, 'copy_and_resolve_references', _copying),
    (cd, '__setstate__', _restoring),
    (cd, 'get_ref', _referencing),
    (frozen, '__init__', _freezing),
    (module, '_configdict_fill_seed', _filling),
    *((cd, name, _quietly) for name in quiet_methods),
  ]


@contextlib.contextmanager
def track_reads(config):
  """Records which leaves of `config` are read inside the block; yields the `ReadTracker`.

  `tracker.was_read(path)` then says whether the leaf at `path` ('train.steps') was read (see the
  comment above for how copies and references count). One tracker at a time (the patch of the
  ConfigDict class is process-wide; other threads' reads count as well).
  """
  global _ACTIVE
  if _ACTIVE is not None:
    raise RuntimeError('track_reads is already active')
  tracker = ReadTracker(config)
  for owner, name, wrap in _patches():
    original = owner.__dict__[name]
    _PATCHED[(owner, name)] = original
    setattr(owner, name, functools.wraps(original)(wrap(original)))
  _ACTIVE = tracker
  try:
    yield tracker
  finally:
    _ACTIVE = None
    for (owner, name), original in _PATCHED.items():
      setattr(owner, name, original)
    _PATCHED.clear()
    tracker.close()
    for node, _ in _walk(config):
      node.__dict__.pop(_ORIGIN, None)


def unread_overrides(tracker: ReadTracker, overrides) -> list[str]:
  """The paths among `overrides` (command-line override paths, e.g. 'train.steps' or 'x[0]' for an
  element of a tuple leaf) whose leaf the tracked run never read."""
  return [p for p in overrides if not tracker.was_read(re.sub(r'\[\d+\]$', '', p))]
