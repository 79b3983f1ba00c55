"""PyTorch checkpoints (pytorch_model.bin) read without torch: every dtype bit for bit, a sharded
Switch checkpoint imported as its safetensors twin is, and pickles that name anything but tensors
refused before they run (tests/fixtures/torch_bin, made by tools/make_bin_fixtures.py)."""
import os
import pickletools
import shutil
import zipfile

import numpy as np
import pytest

from helpers import REPO
from moejax.convert import from_hf, torch_bin
from moejax.convert.safetensors import Checkpoint
from moejax.errors import InputError

FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'torch_bin')
STATE_DICT = os.path.join(FIXTURES, 'state_dict', 'pytorch_model.bin')
MARKER = 'moejax_torch_bin_marker'  # what the malicious pickle's command would create


def _leaves(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, (*prefix, key))
    else:
      yield '/'.join((*prefix, key)), np.asarray(value)


def _bits(array: np.ndarray) -> np.ndarray:
  """As tools/make_bin_fixtures.py writes them: unsigned integers of the item size (complex: of
  each part, in a last axis of 2)."""
  if array.dtype.kind == 'c':
    array = array.view(array.real.dtype).reshape(*array.shape, 2)
  return array.view(f'u{array.dtype.itemsize}')


def _assert_same(read: dict, expected) -> None:
  dtypes = dict(line.split('=') for line in expected['dtypes'])
  assert sorted(read) == sorted(dtypes)
  for name, array in read.items():
    assert str(array.dtype) == dtypes[name], name
    np.testing.assert_array_equal(_bits(array), expected[name], strict=True, err_msg=name)


def test_every_dtype_and_view_is_read_bit_for_bit():
  read = torch_bin.load(STATE_DICT)
  _assert_same(read, np.load(os.path.join(FIXTURES, 'expected.npz')))
  # The transposed view of float32's storage comes out contiguous; the others are views.
  assert read['transposed'].flags.c_contiguous and read['scalar'].shape == ()
  np.testing.assert_array_equal(read['transposed'], read['float32'].T)
  np.testing.assert_array_equal(read['row'], read['float32'][2, 1:5])


def test_compressed_entries_are_read_too(tmp_path):
  """torch stores its entries; a checkpoint zipped again with deflate reads the same."""
  deflated = str(tmp_path / 'deflated.bin')
  with zipfile.ZipFile(STATE_DICT) as source, \
      zipfile.ZipFile(deflated, 'w', zipfile.ZIP_DEFLATED) as target:
    for info in source.infolist():
      target.writestr(info.filename, source.read(info))
  _assert_same(torch_bin.load(deflated), np.load(os.path.join(FIXTURES, 'expected.npz')))


def test_a_sharded_switch_bin_imports_as_its_safetensors_twin():
  directory = os.path.join(FIXTURES, 'switch_transformers')
  assert len([n for n in os.listdir(directory) if n.endswith('.bin')]) == 3
  assert not [n for n in os.listdir(directory) if n.endswith('.safetensors')]
  config, params = from_hf(directory)
  twin_config, twin = from_hf(os.path.join(REPO, 'tests', 'fixtures', 'hf', 'switch_transformers'))
  assert config == twin_config
  leaves, twin_leaves = dict(_leaves(params)), dict(_leaves(twin))
  assert leaves.keys() == twin_leaves.keys()
  for key, array in leaves.items():
    assert array.dtype == twin_leaves[key].dtype, key
    np.testing.assert_array_equal(_bits(array), _bits(twin_leaves[key]), strict=True, err_msg=key)


def test_shards_are_read_when_asked_for_and_only_the_last_is_kept():
  checkpoint = Checkpoint(os.path.join(FIXTURES, 'switch_transformers'))
  shards = checkpoint.files['shared.weight']
  assert shards.current == (None, {})  # the index alone: nothing unpickled yet
  for name in ('shared.weight', 'decoder.block.0.layer.0.SelfAttention.k.weight'):
    assert checkpoint.tensor(name).shape
    assert shards.current[0] == shards.weight_map[name] and name in shards.current[1]
  assert len({shards.weight_map[n] for n in ('shared.weight', 'decoder.block.0.layer.0.'
                                                               'SelfAttention.k.weight')}) == 2


def test_a_pickle_naming_another_global_is_refused_before_it_runs(tmp_path, monkeypatch):
  path = os.path.join(FIXTURES, 'malicious.bin')
  with zipfile.ZipFile(path) as archive:  # the fixture does call os.system
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(archive.read('malicious/data.pkl'))]
  assert ('GLOBAL', 'os system') in ops and ('REDUCE', None) in ops
  monkeypatch.chdir(tmp_path)  # where `touch` would create the marker
  with pytest.raises(InputError) as error:
    torch_bin.load(path)
  message = str(error.value)
  assert '\n' not in message and path in message and 'refused the global os.system' in message
  assert not (tmp_path / MARKER).exists()
  directory = tmp_path / 'hub'  # through the import: the same refusal
  shutil.copytree(os.path.join(FIXTURES, 'switch_transformers'), directory,
                  ignore=shutil.ignore_patterns('*.bin', '*.index.json'))
  shutil.copy(path, directory / 'pytorch_model.bin')
  with pytest.raises(InputError, match='refused the global os.system'):
    from_hf(str(directory))
  assert not (tmp_path / MARKER).exists()


def _checkpoint(path, pickled: bytes, storages: dict[str, bytes]) -> str:
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pickled)
    archive.writestr('archive/byteorder', 'little')
    for key, data in storages.items():
      archive.writestr(f'archive/data/{key}', data)
  return str(path)


def _unicode(text: str) -> bytes:
  return b'X' + len(text).to_bytes(4, 'little') + text.encode()  # BINUNICODE


def _tensor_pickle(length: int) -> bytes:
  """{'w': a float32 tensor of shape [length] over the 4-element storage '0'}, by hand."""
  return (b'\x80\x02}' + _unicode('w') + b'ctorch._utils\n_rebuild_tensor_v2\n('
          + b'(' + _unicode('storage') + b'ctorch\nFloatStorage\n' + _unicode('0')
          + _unicode('cpu') + b'K\x04tQ'  # persistent id ('storage', FloatStorage, '0', 'cpu', 4)
          + b'K\x00' + b'K' + bytes([length]) + b'\x85' + b'K\x01\x85'  # offset, shape, strides
          + b'\x89ccollections\nOrderedDict\n)Rt' + b'Rs.')  # requires_grad, hooks; call; set


def test_hand_written_pickles_read_or_are_refused_in_one_line(tmp_path):
  storage = np.arange(4, dtype='<f4').tobytes()
  good = torch_bin.load(_checkpoint(tmp_path / 'good.bin', _tensor_pickle(4), {'0': storage}))
  np.testing.assert_array_equal(good['w'], np.arange(4, dtype=np.float32))
  cases = {  # what is in data.pkl -> the refusal
      _tensor_pickle(5): 'reaches past its storage 0 of 4 elements',
      b'\x80\x02cbuiltins\neval\n' + _unicode('1') + b'\x85R.': 'refused the global builtins.eval',
      b'\x80\x02ctorch._utils\n_rebuild_qtensor\n.': 'refused the global torch._utils._rebuild_q',
      b'\x80\x02]q\x00.': 'not a state dict',
  }
  for i, (pickled, message) in enumerate(cases.items()):
    path = _checkpoint(tmp_path / f'{i}.bin', pickled, {'0': storage})
    with pytest.raises(InputError, match=message) as error:
      torch_bin.load(path)
    assert '\n' not in str(error.value) and path in str(error.value)


@pytest.mark.parametrize('kind', ['truncated', 'not a zip', 'legacy'])
def test_a_file_that_is_not_a_zip_checkpoint_is_refused_in_one_line(kind, tmp_path):
  path = str(tmp_path / 'pytorch_model.bin')
  if kind == 'truncated':
    data = open(STATE_DICT, 'rb').read()
    open(path, 'wb').write(data[:len(data) // 2])
  elif kind == 'not a zip':
    open(path, 'w').write('<html>404</html>')
  else:
    shutil.copy(os.path.join(FIXTURES, 'legacy.bin'), path)
  with pytest.raises(InputError) as error:
    torch_bin.load(path)
  message = str(error.value)
  assert '\n' not in message and message.startswith(path)
  assert ('torch < 1.6' in message) == (kind == 'legacy')
  assert kind == 'legacy' or 'not a zip' in message
