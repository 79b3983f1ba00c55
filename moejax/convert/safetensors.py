"""The safetensors format, read and written one tensor at a time (no torch, no copy of the model).

A file is an 8-byte little-endian header size, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}} (plus an optional '__metadata__' of strings), then the bytes of every
tensor. Reading memory-maps a tensor's bytes only when it is asked for, so converting a model
holds one input tensor at a time; writing streams each tensor to disk as it comes.

A hub checkpoint is one model.safetensors, or shards model-00001-of-0000N.safetensors named
tensor by tensor in model.safetensors.index.json; `write_checkpoint` writes either.
"""
from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np

from moejax.convert import torch_bin

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_, 'F8_E4M3': ml_dtypes.float8_e4m3fn}
NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'


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
    elif (not os.path.exists(os.path.join(directory, SINGLE))
          and torch_bin.in_directory(directory)):
      shards = torch_bin.Shards(directory)
      self.files = dict.fromkeys(shards.weight_map, shards)
    else:
      single = SafetensorsFile(os.path.join(directory, SINGLE))
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
    size = nbytes(shape, dtype)
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
      f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # no copy to bytes
  os.replace(path + '.tmp', path)


def nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def shard_files(shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                max_shard_bytes: int | None) -> dict[str, str]:
  """{tensor: file} of a checkpoint laid out as the hub does: the tensors in order, a new shard
  whenever the next tensor would take the current one past `max_shard_bytes` (so a larger
  tensor has a shard of its own); one model.safetensors when they all fit in one (or
  `max_shard_bytes` is None)."""
  shards, used = [[]], 0
  for name, (shape, dtype) in shapes.items():
    size = nbytes(shape, dtype)
    if max_shard_bytes is not None and shards[-1] and used + size > max_shard_bytes:
      shards, used = [*shards, []], 0
    shards[-1].append(name)
    used += size
  if len(shards) == 1:
    return dict.fromkeys(shards[0], SINGLE)
  return {name: f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
          for i, shard in enumerate(shards) for name in shard}


def write_checkpoint(directory: str, tensors: Iterable[tuple[str, np.ndarray]],
                     shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                     max_shard_bytes: int | None = None,
                     metadata: dict[str, str] | None = None) -> list[str]:
  """Write `tensors` (as `write_safetensors` takes them) into `directory` as a hub checkpoint:
  the files of `shard_files`, each streamed in turn, then, when there are several, the index
  transformers writes (sorted keys, indent 2: total_parameters and total_size, in bytes, in its
  metadata). The files written, in order."""
  files: dict[str, list[str]] = {}
  for name, file in shard_files(shapes, max_shard_bytes).items():
    files.setdefault(file, []).append(name)
  stream = iter(tensors)
  for file, names in files.items():
    write_safetensors(os.path.join(directory, file), itertools.islice(stream, len(names)),
                      {name: shapes[name] for name in names}, metadata)
  extra = next(stream, None)
  if extra is not None:
    raise ValueError(f'tensor {extra[0]!r} came after the {len(shapes)} announced')
  if len(files) == 1:
    return list(files)
  index = {'metadata': {'total_parameters': sum(int(np.prod(shape, dtype=np.int64))
                                                for shape, _ in shapes.values()),
                        'total_size': sum(nbytes(*spec) for spec in shapes.values())},
           'weight_map': {name: file for file, names in files.items() for name in names}}
  path = os.path.join(directory, INDEX)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(json.dumps(index, indent=2, sort_keys=True) + '\n')
  os.replace(path + '.tmp', path)
  return [*files, INDEX]


def _in_order(tensors: Iterable[tuple[str, np.ndarray]],
              order: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  for (name, array), expected in zip(tensors, order, strict=True):
    if name != expected:
      raise ValueError(f'tensor {name!r} came where {expected!r} was announced')
    yield name, array
