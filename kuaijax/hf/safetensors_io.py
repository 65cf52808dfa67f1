"""Reading and writing the safetensors format without torch: memory-mapped, validated up front.

File layout: an 8-byte little-endian header length n, n bytes of JSON
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes (offsets relative to the end of the header).

`Checkpoint(folder)` opens a single `model.safetensors` or the shards named by
`model.safetensors.index.json`, checks every header (dtypes, shapes against byte sizes, offsets
inside the file, index entries present in their shard) before any tensor is used, and reads tensor
regions from memory maps (`read(name, rows)`: only the rows asked for are touched; the pages are
released after each read so resident memory does not grow with the checkpoint).
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
  'F64': np.dtype('<f8'),
  'F32': np.dtype('<f4'),
  'F16': np.dtype('<f2'),
  'BF16': np.dtype(ml_dtypes.bfloat16),
  'I64': np.dtype('<i8'),
  'I32': np.dtype('<i4'),
  'I16': np.dtype('<i2'),
  'I8': np.dtype('i1'),
  'U8': np.dtype('u1'),
  'BOOL': np.dtype('bool'),
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
_PAGE = mmap.PAGESIZE


class TensorInfo:
  """Where one tensor lives: file, dtype, shape and absolute byte range."""

  def __init__(self, path: str, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int):
    self.path, self.dtype, self.shape, self.begin, self.end = path, dtype, shape, begin, end


def read_header(path: str) -> dict[str, TensorInfo]:
  """Parses and validates the header of one safetensors file; errors name the file and tensor."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f'{path}: truncated safetensors file ({size} bytes, no header)')
    (n,) = struct.unpack('<Q', raw)
    if 8 + n > size:
      raise ValueError(f'{path}: truncated safetensors file (header of {n} bytes, file {size})')
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{path}: the safetensors header is not valid JSON ({e})') from None
  if not isinstance(header, dict):
    raise ValueError(f'{path}: the safetensors header is not a JSON object')
  out = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    try:
      dtype = DTYPES[entry['dtype']]
      shape = tuple(int(d) for d in entry['shape'])
      begin, end = (int(o) for o in entry['data_offsets'])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f'{path}: tensor {name!r} has a bad header entry {entry!r}') from None
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or begin < 0:
      raise ValueError(f'{path}: tensor {name!r} spans {end - begin} bytes for {shape} {dtype}')
    if 8 + n + end > size:
      raise ValueError(
        f'{path}: truncated safetensors file: tensor {name!r} ends at byte {8 + n + end}, the '
        f'file has {size}'
      )
    out[name] = TensorInfo(path, dtype, shape, 8 + n + begin, 8 + n + end)
  return out


class Checkpoint:
  """All tensors of a HF model folder (single file or sharded with an index), memory-mapped;
  `single_file` names the unsharded file (a PEFT adapter's is adapter_model.safetensors)."""

  def __init__(self, folder: str, single_file: str = SINGLE_FILE):
    self.folder = folder
    index_path = os.path.join(folder, INDEX_FILE)
    single = os.path.join(folder, single_file)
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)['weight_map']
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f'{index_path}: not a safetensors index with a weight_map ({e})') from None
      files = sorted(set(weight_map.values()))
      for name in files:
        if not os.path.isfile(os.path.join(folder, name)):
          raise FileNotFoundError(f'{index_path} points to a missing shard {name}')
    elif os.path.isfile(single):
      weight_map, files = None, [single_file]
    else:
      raise FileNotFoundError(f'{folder}: neither {single_file} nor {INDEX_FILE} found')
    self.tensors: dict[str, TensorInfo] = {}
    for name in files:
      path = os.path.join(folder, name)
      for tensor, info in read_header(path).items():
        if weight_map is not None and weight_map.get(tensor) != name:
          raise ValueError(
            f'{path}: tensor {tensor!r} is not listed for this shard in {INDEX_FILE}'
          )
        self.tensors[tensor] = info
    if weight_map is not None:
      missing = sorted(set(weight_map) - set(self.tensors))
      if missing:
        raise ValueError(f'{INDEX_FILE} lists tensors absent from their shards: {missing[:5]}')
    self._maps: dict[str, mmap.mmap] = {}

  def _map(self, path: str) -> mmap.mmap:
    if path not in self._maps:
      with open(path, 'rb') as f:  # the map keeps its own handle
        self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return self._maps[path]

  def read(self, name: str, rows: slice = slice(None)) -> np.ndarray:
    """A copy of tensor `name`'s rows (leading-axis range) as a numpy array of its own dtype."""
    info = self.tensors[name]
    if not info.shape:
      rows = slice(None)
    lead = info.shape[0] if info.shape else 1
    start, stop, _ = rows.indices(lead)
    row_bytes = (info.end - info.begin) // max(lead, 1)
    begin, end = info.begin + start * row_bytes, info.begin + stop * row_bytes
    mm = self._map(info.path)
    view = np.frombuffer(mm, np.uint8, end - begin, begin)
    out = view.view(info.dtype).reshape((stop - start, *info.shape[1:]) if info.shape else ())
    out = out.copy()
    del view
    lo = begin - begin % _PAGE
    mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)  # drop the pages just read from resident memory
    return out

  def close(self):
    for mm in self._maps.values():
      mm.close()
    self._maps.clear()


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
  """Writes numpy arrays as one safetensors file (names sorted, header padded to 8 bytes)."""
  header, offset = {}, 0
  for name in sorted(tensors):
    a = tensors[name]
    if a.dtype not in NAMES:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype {a.dtype}')
    header[name] = {'dtype': NAMES[a.dtype], 'shape': list(a.shape), 'data_offsets': [offset, 0]}
    offset += a.nbytes
    header[name]['data_offsets'][1] = offset
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)))
    f.write(text)
    for name in sorted(tensors):
      f.write(np.ascontiguousarray(tensors[name]).tobytes())  # little-endian hosts
