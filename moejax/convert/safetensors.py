"""The safetensors format, read and written one tensor at a time (no torch, no copy of the model).

A file is an 8-byte little-endian header size, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}} (plus an optional '__metadata__' of strings), then the bytes of every
tensor. Reading memory-maps a tensor's bytes only when it is asked for, so converting a model
holds one input tensor at a time; writing streams each tensor to disk as it comes.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

from moejax.convert import torch_bin

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}
NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
INDEX = 'model.safetensors.index.json'


class SafetensorsFile:
  """The tensors of one .safetensors file, each memory-mapped when asked for."""

  def __init__(self, path: str):
    with open(path, 'rb') as f:
      (size,) = struct.unpack('<Q', f.read(8))
      header = json.loads(f.read(size))
    self.path, self.data_start = path, 8 + size
    self.metadata = header.pop('__metadata__', {})
    self.entries = header

  def __contains__(self, name: str) -> bool:
    return name in self.entries

  def tensor(self, name: str) -> np.ndarray:
    """A read-only view of the file's bytes for `name` (nothing is read until it is used)."""
    entry = self.entries[name]
    begin, end = entry['data_offsets']
    dtype = np.dtype(DTYPES[entry['dtype']])
    if end == begin:
      return np.zeros(entry['shape'], dtype)
    return np.asarray(np.memmap(self.path, dtype, 'r', offset=self.data_start + begin,
                                shape=tuple(entry['shape'])))  # a plain view of the map


class Checkpoint:
  """A hub directory's weights: model.safetensors, or the shards its index names; where neither
  is, pytorch_model.bin or its shards (torch_bin.py)."""

  def __init__(self, directory: str):
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)['weight_map']
      files = {name: SafetensorsFile(os.path.join(directory, name))
               for name in sorted(set(weight_map.values()))}
      self.files = {tensor: files[name] for tensor, name in weight_map.items()}
    elif (not os.path.exists(os.path.join(directory, 'model.safetensors'))
          and torch_bin.in_directory(directory)):
      shards = torch_bin.Shards(directory)
      self.files = dict.fromkeys(shards.weight_map, shards)
    else:
      single = SafetensorsFile(os.path.join(directory, 'model.safetensors'))
      self.files = {tensor: single for tensor in single.entries}

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def names(self) -> list[str]:
    return sorted(self.files)

  def tensor(self, name: str) -> np.ndarray:
    return self.files[name].tensor(name)


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]],
                      shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                      metadata: dict[str, str] | None = None) -> None:
  """Write `tensors` ((name, array) pairs, produced one at a time) to `path`; `shapes` gives each
  name's (shape, dtype) in advance, since the header comes first. Written atomically."""
  header, offset = {}, 0
  for name, (shape, dtype) in shapes.items():
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {'dtype': NAMES[np.dtype(dtype)], 'shape': list(shape),
                    'data_offsets': [offset, offset + size]}
    offset += size
  if metadata:
    header['__metadata__'] = metadata
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # the data starts 8-byte aligned
  with open(path + '.tmp', 'wb') as f:
    f.write(struct.pack('<Q', len(encoded)) + encoded)
    for name, array in _in_order(tensors, list(shapes)):
      expected = shapes[name]
      if array.shape != tuple(expected[0]) or array.dtype != np.dtype(expected[1]):
        raise ValueError(f'{name}: {array.dtype}{list(array.shape)}, announced as '
                         f'{np.dtype(expected[1])}{list(expected[0])}')
      f.write(np.ascontiguousarray(array).tobytes())
  os.replace(path + '.tmp', path)


def _in_order(tensors: Iterable[tuple[str, np.ndarray]],
              order: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  for (name, array), expected in zip(tensors, order, strict=True):
    if name != expected:
      raise ValueError(f'tensor {name!r} came where {expected!r} was announced')
    yield name, array
