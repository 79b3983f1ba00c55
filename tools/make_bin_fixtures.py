"""PyTorch checkpoints (`pytorch_model.bin`) that moejax reads without torch
(`moejax/convert/torch_bin.py`, `tests/test_torch_bin.py`). Not run by `make test`: it needs torch
and transformers 4.57.6.

  python -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers==4.57.6
  /tmp/hf/bin/python tools/make_bin_fixtures.py tests/fixtures/torch_bin

It writes into <out>/:
- state_dict/pytorch_model.bin: tensors of every dtype torch.save gives a storage class, two of
  torch 2.x's `_rebuild_tensor_v3` dtypes (float8, uint16), a transposed (non-contiguous) view,
  a view at an offset into another tensor's storage, a scalar, an empty tensor and an
  nn.Parameter; expected.npz: each one's bits (as unsigned integers of its item size, C order)
  and `dtypes` ('name=numpy dtype' strings).
- switch_transformers/: tests/fixtures/hf/switch_transformers (the same weights) saved with
  `safe_serialization=False` as 3 .bin shards and pytorch_model.bin.index.json.
- malicious.bin: a zip checkpoint whose data.pkl calls os.system('touch <MARKER>') (hand-written
  pickle, protocol 2); checked here to create the marker when unpickled by plain pickle.
- legacy.bin: a checkpoint in torch < 1.6's format (not a zip).
"""
import argparse
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch
import transformers

MARKER = 'moejax_torch_bin_marker'
SWITCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests',
                      'fixtures', 'hf', 'switch_transformers')
UNSIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bits, by item size
NUMPY_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def state_dict() -> dict:
  generator = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=generator)  # float32 [4, 6]
  tensors = {
      'float32': base,
      'transposed': base.t(),  # [6, 4], strides (1, 6): the same storage, non-contiguous
      'row': base[2, 1:5],  # [4] at offset 13 of base's storage
      'float64': torch.randn(3, generator=generator, dtype=torch.float64),
      'float16': torch.randn(2, 3, generator=generator).half(),
      'bfloat16': torch.randn(5, generator=generator).bfloat16(),
      'int64': torch.tensor([-2**40, 0, 7, 2**62], dtype=torch.int64),
      'int32': torch.tensor([-5, 2**30], dtype=torch.int32),
      'int16': torch.tensor([-300, 300], dtype=torch.int16),
      'int8': torch.tensor([-128, 127], dtype=torch.int8),
      'uint8': torch.tensor([0, 255], dtype=torch.uint8),
      'bool': torch.tensor([[True, False], [False, True]]),
      'complex64': torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
      'scalar': torch.tensor(3.25),
      'empty': torch.zeros(0, 3),
      'float8_e4m3fn': torch.tensor([0.5, -1.75, 448.0]).to(torch.float8_e4m3fn),
      'uint16': torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
      'parameter': torch.nn.Parameter(torch.arange(3.0)),
  }
  return tensors


def _bits(tensor: torch.Tensor) -> np.ndarray:
  """The tensor's elements in C order as unsigned integers of its item size."""
  flat = tensor.detach().contiguous()
  size = flat.element_size()
  if flat.dtype.is_complex:
    flat = torch.view_as_real(flat)
    size //= 2
  bits = flat.view(UNSIGNED[size]).numpy().view(NUMPY_UNSIGNED[size])
  return bits.reshape(*tensor.shape, -1) if tensor.dtype.is_complex else bits


def make_state_dict(out: str) -> None:
  tensors = state_dict()
  directory = os.path.join(out, 'state_dict')
  os.makedirs(directory, exist_ok=True)
  torch.save(tensors, os.path.join(directory, 'pytorch_model.bin'))
  numpy_dtype = {torch.bool: 'bool', torch.bfloat16: 'bfloat16', torch.complex64: 'complex64',
                 torch.float8_e4m3fn: 'float8_e4m3fn', torch.uint16: 'uint16'}
  dtypes = [f'{name}={numpy_dtype.get(t.dtype, str(t.dtype).removeprefix("torch."))}'
            for name, t in tensors.items()]
  np.savez(os.path.join(out, 'expected.npz'), dtypes=np.array(dtypes),
           **{name: _bits(t) for name, t in tensors.items()})


def make_switch(out: str) -> None:
  model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(SWITCH)
  directory = os.path.join(out, 'switch_transformers')
  shutil.rmtree(directory, ignore_errors=True)
  model.save_pretrained(directory, safe_serialization=False, max_shard_size='120KB')
  os.remove(os.path.join(directory, 'generation_config.json'))
  names = os.listdir(directory)
  shards = [n for n in names if n.endswith('.bin')]
  assert 2 <= len(shards) <= 3 and not [n for n in names if n.endswith('.safetensors')], names
  print(f'switch_transformers: {len(shards)} shards -> {directory}')


def malicious_pickle() -> bytes:
  """{'weight': os.system('touch MARKER')}, written opcode by opcode (protocol 2)."""
  command = f'touch {MARKER}'.encode()
  return (b'\x80\x02'  # PROTO 2
          b'}'  # EMPTY_DICT
          b'X' + len(b'weight').to_bytes(4, 'little') + b'weight'  # BINUNICODE
          + b'cos\nsystem\n'  # GLOBAL os.system
          + b'X' + len(command).to_bytes(4, 'little') + command
          + b'\x85'  # TUPLE1
          b'R'  # REDUCE: os.system(command)
          b's'  # SETITEM
          b'.')  # STOP


def make_malicious(out: str) -> None:
  data = malicious_pickle()
  with tempfile.TemporaryDirectory() as scratch:  # the payload works when unpickled by pickle
    subprocess.run([sys.executable, '-c', f'import pickle; pickle.loads({data!r})'], cwd=scratch,
                   check=True)
    assert os.path.exists(os.path.join(scratch, MARKER))
  with zipfile.ZipFile(os.path.join(out, 'malicious.bin'), 'w') as archive:
    archive.writestr('malicious/data.pkl', data)
    archive.writestr('malicious/byteorder', 'little')
    archive.writestr('malicious/version', '3\n')


def make_legacy(out: str) -> None:
  buffer = io.BytesIO()
  torch.save({'weight': torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
  with open(os.path.join(out, 'legacy.bin'), 'wb') as f:
    f.write(buffer.getvalue())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('out', help='directory to write the fixtures into')
  args = parser.parse_args()
  assert transformers.__version__ == '4.57.6', transformers.__version__
  os.makedirs(args.out, exist_ok=True)
  make_state_dict(args.out)
  make_switch(args.out)
  make_malicious(args.out)
  make_legacy(args.out)


if __name__ == '__main__':
  main()
