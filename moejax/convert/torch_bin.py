"""PyTorch checkpoints (`pytorch_model.bin`, one file or the shards its index names), read without
torch and without running anything a pickle names.

`torch.save` writes a zip (its default since torch 1.6): `<prefix>/data.pkl`, a pickle of the
state dict in which each tensor is a call of `torch._utils._rebuild_tensor_v2(storage, offset,
shape, strides, ...)`, each storage a persistent id `('storage', torch.FloatStorage, key, device,
numel)` whose bytes are the stored (uncompressed) entry `<prefix>/data/<key>`, and
`<prefix>/byteorder`. torch 2.x saves the dtypes that have no storage class of their own (float8,
uint16/32/64) as bytes (`torch.storage.UntypedStorage`) with `_rebuild_tensor_v3`, which adds the
dtype (`torch.float8_e4m3fn`).

The pickle is read by an Unpickler that resolves only the names in ALLOWED, to stand-ins of this
module, and refuses any other global when it meets its name, before anything is called. A tensor
is a view of the memory-mapped entry (nothing is read until it is used); one with gaps between its
elements (a transposed view) is copied into a contiguous array. Checkpoints saved by torch < 1.6
(not a zip) are refused: re-saving them with a newer torch makes them readable.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from moejax.errors import InputError

FILE, INDEX = 'pytorch_model.bin', 'pytorch_model.bin.index.json'
# What torch.save writes for a tensor's storage (its legacy storage class) -> the NumPy dtype.
STORAGES = {'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
            'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64,
            'IntStorage': np.int32, 'ShortStorage': np.int16, 'CharStorage': np.int8,
            'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
            'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128}
# The dtypes torch 2.x saves as bytes with `_rebuild_tensor_v3` (torch.storage._new_dtypes).
V3_DTYPES = {'uint16': np.uint16, 'uint32': np.uint32, 'uint64': np.uint64,
             'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2,
             'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz,
             'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
             'float8_e8m0fnu': ml_dtypes.float8_e8m0fnu}
# torch.save < 1.6 began with this number, pickled (protocol 2).
LEGACY_MAGIC = b'\x80\x02\x8a\x0a' + (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')


class DType(NamedTuple):
  """A storage class or a dtype named by the pickle (immutable: a pickle cannot change it)."""
  name: str
  dtype: np.dtype


class Storage(NamedTuple):
  """A storage's elements, flat [numel]."""
  key: str
  array: np.ndarray


ALLOWED = {  # every global a state dict of tensors names; nothing else is resolved
    ('collections', 'OrderedDict'): 'the state dict, and each tensor\'s empty backward hooks',
    ('torch._utils', '_rebuild_tensor_v2'): 'a tensor of a storage class',
    ('torch._utils', '_rebuild_tensor_v3'): 'a tensor of bytes and a dtype (torch 2.x, float8)',
    ('torch._utils', '_rebuild_parameter'): 'an nn.Parameter: its tensor',
    ('torch.storage', 'UntypedStorage'): 'the bytes of a _rebuild_tensor_v3 tensor',
    **{('torch', name): 'a storage class' for name in STORAGES},
    **{('torch', name): 'a _rebuild_tensor_v3 dtype' for name in V3_DTYPES},
}


def load(path: str) -> dict[str, np.ndarray]:
  """name -> array of the torch zip checkpoint `path` (read-only views of the mapped file, but for
  tensors with gaps between their elements, which are copied)."""
  archive = _open_zip(path)
  with archive:
    prefix = archive.namelist()[0].split('/')[0]
    names = set(archive.namelist())
    if f'{prefix}/data.pkl' not in names:
      raise InputError(f'{path}: not a torch checkpoint (the zip has no {prefix}/data.pkl)')
    _check_byteorder(archive, path, prefix, names)
    unpickler = _Unpickler(archive, path, prefix)
    state = unpickler.load_safely()
  if not isinstance(state, dict) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
    raise InputError(f'{path}: not a state dict (a dict of tensors by name)')
  return dict(state)


class Shards:
  """The tensors of `directory`'s pytorch_model.bin, or of the shards its index names. A shard is
  read (unpickled whole) when one of its tensors is first asked for; only the last one is kept."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      self.weight_map = _weight_map(index)
      self.current: tuple[str | None, dict] = (None, {})
    else:
      tensors = load(os.path.join(directory, FILE))
      self.weight_map = dict.fromkeys(tensors, FILE)
      self.current = (FILE, tensors)

  def tensor(self, name: str) -> np.ndarray:
    file = self.weight_map[name]
    if self.current[0] != file:
      self.current = (None, {})  # let the last shard go before the next one is read
      self.current = (file, load(os.path.join(self.directory, file)))
    if name not in self.current[1]:
      raise InputError(f'{os.path.join(self.directory, file)}: no tensor {name}, which '
                       f'{INDEX} places there')
    return self.current[1][name]


def in_directory(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, name)) for name in (FILE, INDEX))


def _weight_map(index: str) -> dict[str, str]:
  try:
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
  except (ValueError, KeyError, TypeError) as error:
    raise InputError(f'{index}: not a checkpoint index ({type(error).__name__}: '
                     f'{_one_line(error)})') from None
  return weight_map


def _open_zip(path: str) -> zipfile.ZipFile:
  with open(path, 'rb') as f:
    start = f.read(len(LEGACY_MAGIC))
  if start == LEGACY_MAGIC:
    raise InputError(f'{path}: saved by torch < 1.6, which moejax does not read; re-save it with '
                     f'a newer torch: torch.save(torch.load(path), path)')
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as error:
    raise InputError(f'{path}: not a torch checkpoint (not a zip: {error}; truncated, or '
                     f'another format)') from None
  if not archive.namelist():
    raise InputError(f'{path}: not a torch checkpoint (an empty zip)')
  return archive


def _check_byteorder(archive: zipfile.ZipFile, path: str, prefix: str, names: set) -> None:
  name = f'{prefix}/byteorder'  # absent before torch 1.13: little-endian
  if name in names and archive.read(name) != b'little':
    raise InputError(f'{path}: saved on a big-endian machine, which moejax does not read; '
                     f're-save it on a little-endian one')


class _Unpickler(pickle.Unpickler):
  """Resolves the globals of ALLOWED to this class's stand-ins and refuses any other;
  storages are memory-mapped from the zip."""

  def __init__(self, archive: zipfile.ZipFile, path: str, prefix: str):
    self.archive, self.path, self.prefix = archive, path, prefix
    self.file = archive.open(f'{prefix}/data.pkl')
    super().__init__(self.file)
    self.bytes = np.memmap(path, np.uint8, 'r')  # the whole zip [bytes]

  def load_safely(self) -> Any:
    try:
      return self.load()
    except InputError:
      raise
    except Exception as error:  # noqa: BLE001: whatever a broken pickle raises, named in one line
      raise InputError(f'{self.path}: not a readable torch checkpoint ({type(error).__name__}: '
                       f'{_one_line(error)})') from None
    finally:
      self.file.close()

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in ALLOWED:
      raise InputError(f'{self.path}: refused the global {module}.{name} (a state dict of tensors '
                       f'needs only torch\'s tensor and storage types); nothing was run')
    if module == 'collections':
      return collections.OrderedDict
    if module == 'torch':
      return DType(name, np.dtype({**STORAGES, **V3_DTYPES}[name]))
    if name == 'UntypedStorage':
      return DType(name, np.dtype(np.uint8))  # bytes
    return getattr(self, name)  # a bound method: a pickle cannot change what it does

  def persistent_load(self, pid: Any) -> Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], DType) and pid[1].name in (*STORAGES, 'UntypedStorage')):
      raise InputError(f'{self.path}: unknown persistent id {_one_line(pid)[:80]} (not a storage)')
    _, kind, key, _, numel = pid  # the device does not matter: the bytes are the same
    name = f'{self.prefix}/data/{key}'
    try:
      info = self.archive.getinfo(name)
    except KeyError:
      raise InputError(f'{self.path}: no {name}, a storage the pickle names') from None
    if info.file_size != numel * kind.dtype.itemsize:
      raise InputError(f'{self.path}: {name} holds {info.file_size} bytes, not the '
                       f'{numel} x {kind.dtype.itemsize} its pickle says')
    return Storage(key, self._entry(info).view(kind.dtype))

  def _entry(self, info: zipfile.ZipInfo) -> np.ndarray:
    """The bytes of an entry: a view of the mapped file where stored (as torch writes them)."""
    if info.compress_type != zipfile.ZIP_STORED:
      return np.frombuffer(self.archive.read(info), np.uint8)
    header = bytes(self.bytes[info.header_offset:info.header_offset + 30])
    name_size, extra_size = struct.unpack('<HH', header[26:30])
    start = info.header_offset + 30 + name_size + extra_size
    return self.bytes[start:start + info.file_size]

  def _rebuild_tensor_v2(self, storage: Storage, offset: int, shape: tuple, strides: tuple,
                         requires_grad: bool, hooks: Any, metadata: Any = None) -> np.ndarray:
    return _strided(storage, offset, shape, strides, self.path)

  def _rebuild_tensor_v3(self, storage: Storage, offset: int, shape: tuple, strides: tuple,
                         requires_grad: bool, hooks: Any, dtype: DType,
                         metadata: Any = None) -> np.ndarray:
    if not isinstance(dtype, DType) or dtype.name not in V3_DTYPES:
      raise InputError(f'{self.path}: _rebuild_tensor_v3 of {_one_line(dtype)[:40]}, not a dtype')
    typed = Storage(storage.key, storage.array.view(np.uint8).view(dtype.dtype))
    return _strided(typed, offset, shape, strides, self.path)

  def _rebuild_parameter(self, data: np.ndarray, requires_grad: bool, hooks: Any) -> np.ndarray:
    return data


def _strided(storage: Storage, offset: int, shape: tuple, strides: tuple, path: str) -> np.ndarray:
  """The tensor (shape, strides and offset in elements) over `storage` [numel]: a view when its
  elements are contiguous, else a contiguous copy. Every index is checked to lie in the storage."""
  if not isinstance(storage, Storage) or not _ints(shape, strides, (offset,)) \
      or len(shape) != len(strides):
    raise InputError(f'{path}: a tensor of storage {_one_line(storage)[:40]}, offset '
                     f'{offset!r}, shape {shape!r}, strides {strides!r} is not one')
  flat = storage.array  # [numel]
  last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
  if (min((*shape, *strides, offset), default=0) < 0
      or (0 not in shape and last >= flat.size)):
    raise InputError(f'{path}: tensor of shape {shape}, strides {strides} at offset {offset} '
                     f'reaches past its storage {storage.key} of {flat.size} elements')
  if 0 in shape:
    return np.zeros(shape, flat.dtype)
  itemsize = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape, [s * itemsize for s in strides],
                                         writeable=False)
  return view if view.flags.c_contiguous else np.ascontiguousarray(view)


def _ints(*tuples: Any) -> bool:
  return all(isinstance(t, tuple) and all(type(i) is int for i in t) for t in tuples)


def _one_line(value: Any) -> str:
  return ' '.join(str(value).split())
