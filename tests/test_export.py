"""Export in the hub's layout: each fixture of tests/fixtures/hf (and its published configs)
written as safetensors shards with transformers' index and its tokenizer files, then read back
bit for bit; `moejax export-hf` on an imported run. That transformers loads these exports with
the original's logits is tools/check_hf_export.py's (it needs torch)."""
import dataclasses
import json
import os
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from helpers import REPO, run_cli
from moejax.convert import from_hf, from_hf_variables, to_hf
from moejax.convert.hf import FAMILIES, hub_model_type
from moejax.convert.safetensors import INDEX, SINGLE, Checkpoint, SafetensorsFile, shard_files
from moejax.convert.workdir import parse_size
from moejax.data.tokenizers import HUB_TOKENIZER_CONFIGS, HUB_TOKENIZER_FILES
from moejax.errors import ConfigError, InputError

HF = os.path.join(REPO, 'tests', 'fixtures', 'hf')
PUBLISHED = os.path.join(HF, 'published')
SOURCES = [os.path.join(HF, family) for family in FAMILIES] + sorted(
    os.path.join(PUBLISHED, d) for d in os.listdir(PUBLISHED)
    if os.path.isdir(os.path.join(PUBLISHED, d)))
# What an export copies from a tokenizer directory (its config.json is the model's own).
TOKENIZER_FILES = [n for n in (*HUB_TOKENIZER_FILES, *HUB_TOKENIZER_CONFIGS) if n != 'config.json']


def _has_tokenizer(directory) -> bool:
  return any(os.path.exists(os.path.join(directory, f)) for f in HUB_TOKENIZER_FILES)


def _hub_order(source) -> list[str]:
  """The hub tensors of a fixture in the family's order (what an export writes)."""
  config, _ = from_hf(source)
  return [name for t in FAMILIES[hub_model_type(source)].tensors(config) for name in t.names]


def _leaves(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, (*prefix, key))
    else:
      yield '/'.join((*prefix, key)), np.asarray(value)


def _assert_same_params(first, second):
  first, second = dict(_leaves(first)), dict(_leaves(second))
  assert first.keys() == second.keys()
  for key, array in first.items():
    assert array.dtype == second[key].dtype and array.shape == second[key].shape, key
    assert array.tobytes() == second[key].tobytes(), key


def _assert_tokenizer_copied(source, out):
  copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(source, n))]
  assert any(n in HUB_TOKENIZER_FILES for n in copied)
  for name in copied:
    with open(os.path.join(source, name), 'rb') as a, open(os.path.join(out, name), 'rb') as b:
      assert a.read() == b.read(), name


@pytest.mark.parametrize('source', SOURCES, ids=lambda s: os.path.relpath(s, HF))
def test_a_sharded_export_has_the_hubs_index_and_reads_back_bit_for_bit(source, tmp_path):
  config, variables = from_hf_variables(source)
  params = variables.pop('params')  # and DeepSeek-V3's correction biases, a state
  # The source as its family reads it (gpt-oss's MXFP4 experts dequantized).
  original, order = FAMILIES[hub_model_type(source)].open(source), _hub_order(source)
  sizes = {name: original.tensor(name).nbytes for name in order}
  # At least 5 shards, and the largest tensor over the limit (a shard of its own).
  limit = min(sum(sizes.values()) // 5, max(sizes.values()) - 1)
  tokenizer = source if _has_tokenizer(source) else None
  out = str(tmp_path / 'out')
  files = to_hf(config, params, out, hub_model_type(source), limit, tokenizer, variables)
  with open(os.path.join(out, INDEX), encoding='utf-8') as f:
    text = f.read()
  index = json.loads(text)
  assert text == json.dumps(index, indent=2, sort_keys=True) + '\n'  # transformers' own layout
  n = len(set(index['weight_map'].values()))
  shards = [f'model-{i:05d}-of-{n:05d}.safetensors' for i in range(1, n + 1)]
  assert n >= 3 and sorted(set(index['weight_map'].values())) == shards
  assert files == [*shards, INDEX, 'config.json'] and not os.path.exists(os.path.join(out, SINGLE))
  assert sorted(index['weight_map']) == sorted(order)
  # Only DeepSeek-V3's multi-token-prediction layer (past the last) is left out.
  assert all(name.startswith(f'model.layers.{config.num_layers}.')
             for name in set(original.names()) - set(order))
  assert index['metadata'] == {'total_size': sum(sizes.values()),
                               'total_parameters': sum(original.tensor(m).size for m in order)}
  written, shard_bytes = [], []
  for shard in shards:
    read = SafetensorsFile(os.path.join(out, shard))
    names = sorted(read.entries, key=lambda name: read.entries[name]['data_offsets'])
    assert {index['weight_map'][name] for name in names} == {shard}
    assert read.metadata == {'format': 'pt'}
    shard_bytes.append(sum(sizes[name] for name in names))
    assert shard_bytes[-1] <= limit or len(names) == 1, shard
    written += names
  assert written == order  # the hub's order, shard after shard
  assert any(sizes[name] > limit for name in order)
  for i in range(n - 1):  # each shard full: the next shard's first tensor would not fit
    first_next = next(m for m in order if index['weight_map'][m] == shards[i + 1])
    assert shard_bytes[i] + sizes[first_next] > limit
  exported = Checkpoint(out)
  for name in order:
    a, b = original.tensor(name), exported.tensor(name)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
  again_config, again = from_hf_variables(out)
  assert again_config == config
  _assert_same_params({'params': params, **variables}, again)
  if tokenizer:
    _assert_tokenizer_copied(source, out)


def test_shards_fill_in_order_and_a_tensor_over_the_limit_has_its_own():
  """Bytes 4, 4, 10, 3, 3, 3 at a limit of 8: [4 4] fills one; 10 goes alone; 3 + 3 = 6, and
  another 3 would make 9."""
  shapes = {name: ((size,), np.uint8) for name, size in zip('abcdef', (4, 4, 10, 3, 3, 3))}
  files = shard_files(shapes, 8)
  groups = [[name for name in shapes if files[name] == file]
            for file in dict.fromkeys(files.values())]
  assert groups == [['a', 'b'], ['c'], ['d', 'e'], ['f']]
  assert files['a'] == 'model-00001-of-00004.safetensors'
  assert set(shard_files(shapes, 27).values()) == {SINGLE}  # all fits: no shards, no index
  assert set(shard_files(shapes, None).values()) == {SINGLE}


def test_an_export_that_fits_one_file_writes_no_index(tmp_path):
  config, params = from_hf(os.path.join(HF, 'mixtral'))
  assert to_hf(config, params, str(tmp_path), 'mixtral', 10**9) == [SINGLE, 'config.json']
  assert not os.path.exists(tmp_path / INDEX)
  _assert_same_params(params, from_hf(str(tmp_path))[1])


def test_a_bfloat16_model_exports_sharded_in_bfloat16(tmp_path):
  config, params = from_hf(os.path.join(HF, 'olmoe'))
  bf16 = _cast(params, ml_dtypes.bfloat16)
  to_hf(config, bf16, str(tmp_path), 'olmoe', 20_000)
  with open(tmp_path / INDEX) as f:
    index = json.load(f)
  assert index['metadata']['total_size'] == 2 * index['metadata']['total_parameters']
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['torch_dtype'] == 'bfloat16'
  again_config, again = from_hf(str(tmp_path))
  assert again_config.param_dtype == 'bfloat16'
  for key, array in _leaves(again):
    assert array.dtype == (np.float32 if 'router' in key else ml_dtypes.bfloat16), key
    assert array.astype(ml_dtypes.bfloat16).tobytes() == dict(_leaves(bf16))[key].tobytes(), key


def _cast(tree, dtype):
  return {k: _cast(v, dtype) if isinstance(v, dict) else np.asarray(v, dtype)
          for k, v in tree.items()}


def test_an_export_holds_one_param_at_a_time(tmp_path):
  """Peak memory traced during a sharded export of 34 MiB of Mixtral-shaped params (NumPy
  reports its buffers to tracemalloc): the transposed copy of the largest param (the output
  layer, 4 MiB) and little else, not the model."""
  family = FAMILIES['mixtral']
  config = family.read(dict(vocab_size=4096, hidden_size=256, intermediate_size=512,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
  params, rng = {}, np.random.default_rng(0)
  for tensor in family.tensors(config):
    tree = params
    for key in tensor.path[:-1]:
      tree = tree.setdefault(key, {})
    tree[tensor.path[-1]] = rng.standard_normal(tensor.shape, np.float32)
  total = sum(a.nbytes for _, a in _leaves(params))
  largest = max(a.nbytes for _, a in _leaves(params))
  assert total > 8 * largest
  tracemalloc.start()
  try:
    to_hf(config, params, str(tmp_path), 'mixtral', 8 * 2**20)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < largest + 2**20, (peak, largest)
  assert len(os.listdir(tmp_path)) > 5


def test_an_export_that_does_not_fit_is_refused_naming_why(tmp_path):
  config, params = from_hf(os.path.join(HF, 'olmoe'))
  with pytest.raises(ConfigError, match='^model.qk_norm=True is invalid: mixtral checkpoints '
                                        'hold False'):
    to_hf(config, params, str(tmp_path / 'a'), 'mixtral')  # its q and k norms would be lost
  with pytest.raises(InputError, match='no qwen2_moe checkpoint holds this model'):
    to_hf(config, params, str(tmp_path / 'a'), 'qwen2_moe')  # Qwen's has a shared expert
  with pytest.raises(ConfigError, match="^model.moe_every=2 is invalid: olmoe checkpoints hold "
                                        r"\(\(True, True\),\) \(here \(\(False, True\),\)\)"):
    to_hf(dataclasses.replace(config, moe_every=2), params, str(tmp_path / 'a'), 'olmoe')
  fewer = {**params, 'decoder': {k: v for k, v in params['decoder'].items() if k != 'unit_1'}}
  with pytest.raises(InputError, match='the params have no decoder/unit_1/block_0/'):
    to_hf(config, fewer, str(tmp_path / 'a'), 'olmoe')
  more = {**params, 'extra': {'kernel': np.zeros(3)}}
  with pytest.raises(InputError, match='param extra/kernel has no place in olmoe checkpoints'):
    to_hf(config, more, str(tmp_path / 'a'), 'olmoe')
  with pytest.raises(InputError, match="model_type 'dbrx' is not one moejax exports"):
    to_hf(config, params, str(tmp_path / 'a'), 'dbrx')
  to_hf(config, params, str(tmp_path / 'b'), 'olmoe')
  with pytest.raises(InputError, match='already holds a checkpoint'):
    to_hf(config, params, str(tmp_path / 'b'), 'olmoe', 20_000)
  with pytest.raises(InputError, match='holds no tokenizer'):
    to_hf(config, params, str(tmp_path / 'c'), 'olmoe', tokenizer_dir=os.path.join(HF, 'olmoe'))
  assert not os.path.exists(tmp_path / 'a')


def test_shard_sizes_are_read_as_the_hub_writes_them():
  assert parse_size('500MB') == 500 * 10**6 and parse_size('5GB') == 5 * 10**9
  assert parse_size('5gb') == parse_size(' 5 GB ') == 5 * 10**9
  assert parse_size('1.5KB') == 1500 and parse_size('123') == parse_size('123B') == 123
  for bad in ('5GiB', '', 'MB', '0', '-1GB', '5K'):
    with pytest.raises(InputError, match='--max-shard-size .* is not a size'):
      parse_size(bad)


def _one_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
  return lines[0]


def test_export_hf_refuses_in_one_line_before_reading_the_run(tmp_path, capsys):
  from moejax.train.config import default_config
  workdir, out = tmp_path / 'run', tmp_path / 'out'
  workdir.mkdir()
  (workdir / 'config.json').write_text(default_config().to_json())  # trained, not imported
  status, _, err = run_cli(capsys, 'export-hf', '--workdir', workdir, '--out', out)
  assert status == 2 and '--model-type' in _one_line(err) and 'was not imported' in err
  status, _, err = run_cli(capsys, 'export-hf', '--workdir', workdir, '--out', out,
                           '--model-type', 'mixtral', '--max-shard-size', '5GiB')
  assert status == 2 and "--max-shard-size '5GiB' is not a size" in _one_line(err)
  out.mkdir()
  (out / 'notes.txt').write_text('mine\n')
  status, _, err = run_cli(capsys, 'export-hf', '--workdir', workdir, '--out', out,
                           '--model-type', 'mixtral')
  assert status == 2 and _one_line(err) == (f'moejax export-hf: --out {out} is not empty; '
                                            'export into a new or an empty directory')
  status, _, err = run_cli(capsys, 'export-hf', '--workdir', workdir, '--out', out / 'notes.txt')
  assert status == 2 and 'notes.txt is a file' in _one_line(err)
  assert os.listdir(out) == ['notes.txt']


@pytest.mark.slow
def test_export_hf_writes_an_imported_run_back_with_its_tokenizer(tmp_path, tfds_dir, capsys):
  source = os.path.join(PUBLISHED, 'mistralai__Mixtral-8x7B-v0.1')
  workdir, out = tmp_path / 'run', tmp_path / 'out'
  status, _, err = run_cli(
      capsys, 'import-hf', source, '--workdir', workdir,
      f'--config.data.source={os.path.join(REPO, "data", "timemachine.txt")}',
      f'--config.data.data_dir={tfds_dir}', '--config.data.length=32')
  assert status == 0, err
  out.mkdir()  # an empty directory is taken
  status, stdout, err = run_cli(capsys, 'export-hf', '--workdir', workdir, '--out', out,
                                '--max-shard-size', '40KB')
  assert status == 0, err
  report = json.loads(stdout[stdout.index('{'):])
  assert report['model_type'] == 'mixtral' and report['step'] == 0  # as imported
  assert report['tokenizer'] == str(workdir / 'tokenizer')
  with open(out / INDEX) as f:
    assert len(set(json.load(f)['weight_map'].values())) >= 3
  config, params = from_hf(source)
  again_config, again = from_hf(str(out))
  assert again_config == config
  _assert_same_params(params, again)
  _assert_tokenizer_copied(source, str(out))
  status, _, err = run_cli(capsys, 'export-hf', '--workdir', workdir, '--out', out)
  assert status == 2 and 'is not empty' in _one_line(err)
