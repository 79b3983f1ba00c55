"""Published checkpoints in and out: moejax's import of tiny random Hugging Face models against the
outputs transformers 4.57.6 gave for them (tests/fixtures/hf, made by tools/make_hf_fixtures.py),
the export back, and the safetensors reader and writer. No torch needed."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, apply_imported, reference_weights, run_cli
from moejax.convert import from_hf, to_hf
from moejax.convert.safetensors import Checkpoint, SafetensorsFile, write_safetensors
from moejax.errors import InputError

FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'hf')
FAMILIES = ['mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe', 'gpt_oss', 'switch_transformers']


def _reference(family):
  return dict(np.load(os.path.join(FIXTURES, family, 'reference.npz')))


@pytest.mark.parametrize('family', FAMILIES)
def test_imported_model_gives_the_reference_logits_probabilities_and_experts(family):
  config, params = from_hf(os.path.join(FIXTURES, family))
  reference = _reference(family)
  logits, probs, chosen, dropped, weights = apply_imported(config, params, reference)
  np.testing.assert_allclose(logits, reference['logits'], atol=1e-4, rtol=0)
  assert len(probs) == len(reference['router_probs'])
  for layer, expected in enumerate(reference['router_probs']):
    np.testing.assert_allclose(probs[layer], expected, atol=1e-5)
    # The same experts, in the same order (by probability, the reference's torch.topk).
    np.testing.assert_array_equal(chosen[layer], reference['experts'][layer])
    kept = ~dropped[layer]
    np.testing.assert_allclose(weights[layer][kept],
                               reference_weights(config, reference, layer)[kept], atol=1e-5)
    assert not dropped[layer].any() or family == 'switch_transformers'  # the others: dropless


def test_switch_drops_exactly_the_tokens_the_reference_drops():
  """A capacity of 3 tokens per expert and sequence: 16 of the 48 choices of the fixture's two
  sparse layers are over it, in transformers 4.57.6 and in moejax alike."""
  config, params = from_hf(os.path.join(FIXTURES, 'switch_transformers'))
  reference = _reference('switch_transformers')
  assert config.expert_capacity == 3 and int(reference['dropped'].sum()) == 16
  _, _, _, dropped, _ = apply_imported(config, params, reference)
  np.testing.assert_array_equal(np.stack(dropped)[..., 0], reference['dropped'])


@pytest.mark.parametrize('family', FAMILIES)
def test_export_writes_the_hub_tensors_bit_for_bit_and_imports_again(family, tmp_path):
  source = os.path.join(FIXTURES, family)
  config, params = from_hf(source)
  to_hf(config, params, str(tmp_path), family)
  original, exported = Checkpoint(source), Checkpoint(str(tmp_path))
  assert exported.names() == original.names()
  for name in original.names():
    a, b = original.tensor(name), exported.tensor(name)
    assert a.dtype == b.dtype and a.shape == b.shape, name
    assert a.tobytes() == b.tobytes(), name
  again_config, again = from_hf(str(tmp_path))
  assert again_config == config
  flat = lambda tree: {k: v for k, v in _leaves(tree)}
  first, second = flat(params), flat(again)
  assert first.keys() == second.keys()
  for key in first:
    assert first[key].tobytes() == second[key].tobytes(), key
  with open(os.path.join(source, 'config.json')) as f:
    hub = json.load(f)
  with open(tmp_path / 'config.json') as f:
    written = json.load(f)
  shared = set(hub) & set(written) - {'torch_dtype', 'transformers_version', 'dtype',
                                      'intermediate_size'}  # Qwen's dense FFN: no such layer
  assert {k: written[k] for k in shared} == {k: hub[k] for k in shared}


def _leaves(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, (*prefix, key))
    else:
      yield '/'.join((*prefix, key)), np.asarray(value)


def test_safetensors_round_trip_by_hand(tmp_path):
  tensors = {'b': np.arange(6, dtype=np.float32).reshape(2, 3),
             'a': np.array([1, -2], np.int64), 'empty': np.zeros((0, 4), np.float16)}
  shapes = {name: (t.shape, t.dtype) for name, t in tensors.items()}
  path = str(tmp_path / 'x.safetensors')
  write_safetensors(path, iter(tensors.items()), shapes, {'format': 'pt'})
  with open(path, 'rb') as f:
    size = int.from_bytes(f.read(8), 'little')
    header = json.loads(f.read(size))
  assert (8 + size) % 8 == 0 and header['__metadata__'] == {'format': 'pt'}
  assert header['b'] == {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [0, 24]}
  assert header['a'] == {'dtype': 'I64', 'shape': [2], 'data_offsets': [24, 40]}
  read = SafetensorsFile(path)
  for name, tensor in tensors.items():
    np.testing.assert_array_equal(read.tensor(name), tensor)
    assert read.tensor(name).dtype == tensor.dtype
  with pytest.raises(ValueError, match='announced'):
    write_safetensors(path, iter([('a', tensors['a'])]), {'a': ((3,), np.int64)})


def test_a_checkpoint_moejax_cannot_import_is_refused_naming_why(tmp_path):
  with pytest.raises(InputError, match='not a Hugging Face hub directory'):
    from_hf(str(tmp_path))
  source = os.path.join(FIXTURES, 'mixtral')
  for change, message in (({'model_type': 'dbrx'}, "model_type 'dbrx' is not one"),
                          ({'tie_word_embeddings': True}, 'tie_word_embeddings=True is not'),
                          ({'rope_scaling': {'type': 'yarn'}}, 'rope_scaling=.* is not')):
    directory = tmp_path / next(iter(change))
    shutil.copytree(source, directory)
    with open(directory / 'config.json') as f:
      hub = json.load(f)
    with open(directory / 'config.json', 'w') as f:
      json.dump({**hub, **change}, f)
    with pytest.raises(InputError, match=message):
      from_hf(str(directory))
  fewer = tmp_path / 'fewer'
  shutil.copytree(source, fewer)
  with open(fewer / 'config.json') as f:
    hub = json.load(f)
  with open(fewer / 'config.json', 'w') as f:
    json.dump({**hub, 'num_hidden_layers': 3}, f)
  with pytest.raises(InputError, match='no tensor model.layers.2'):
    from_hf(str(fewer))


def test_an_imported_checkpoint_evaluates_samples_analyzes_and_fine_tunes(tmp_path, tfds_dir,
                                                                          capsys):
  workdir = tmp_path / 'mixtral'
  data = [f'--config.data.source={os.path.join(REPO, "data", "timemachine.txt")}',
          f'--config.data.data_dir={tfds_dir}', '--config.data.length=32',
          '--config.eval.max_batches=2', '--config.eval.batch_size=8']
  status, out, err = run_cli(capsys, 'import-hf', os.path.join(FIXTURES, 'mixtral'),
                             '--workdir', workdir, *data)
  assert status == 0, err
  # (TFDS says on stdout that it prepared the dataset first.)
  assert json.loads(out[out.index('{'):])['parameters'] == 60064  # transformers' count too
  # The checkpoint holds the imported params bit for bit.
  from moejax.train.config import saved_config
  from moejax.train.resume import load
  _, imported = from_hf(os.path.join(FIXTURES, 'mixtral'))
  _, state = load(saved_config(str(workdir)), str(workdir))
  restored = dict(_leaves(state.params))
  assert restored.keys() == dict(_leaves(imported)).keys()
  for key, array in _leaves(imported):
    assert array.tobytes() == restored[key].tobytes(), key
  status, out, err = run_cli(capsys, 'eval', '--workdir', workdir)
  assert status == 0, err
  assert np.isfinite(json.loads(out)['nll'])
  status, out, err = run_cli(capsys, 'sample', '--workdir', workdir, '--num_tokens', '8')
  assert status == 0 and '--- sample' in out, err
  status, out, err = run_cli(capsys, 'analyze', '--workdir', workdir, '--max_tokens', '64')
  assert status == 0 and os.path.exists(workdir / 'analysis' / 'routing.json'), err
  # Fine-tuning: train resumes from step 0 with the saved config and new settings.
  status, out, err = run_cli(capsys, 'train', '--workdir', workdir, '--config.train.num_steps=3',
                             '--config.train.batch_size=4', '--config.checkpoint.every_steps=3')
  assert status == 0, err
  with open(workdir / 'metrics.jsonl') as f:
    losses = [json.loads(line)['loss'] for line in f if '"train"' in line]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['0', '3']
  # Importing again over the run is refused, and changes nothing.
  status, _, err = run_cli(capsys, 'import-hf', os.path.join(FIXTURES, 'mixtral'), '--workdir',
                           workdir, *data)
  assert status == 2 and 'already holds checkpoints' in err
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['0', '3']


def test_an_import_whose_overrides_change_the_architecture_is_refused(tmp_path, tfds_dir, capsys):
  status, _, err = run_cli(capsys, 'import-hf', os.path.join(FIXTURES, 'olmoe'), '--workdir',
                           tmp_path / 'w', f'--config.data.data_dir={tfds_dir}',
                           '--config.data.source=' + os.path.join(REPO, 'data', 'timemachine.txt'),
                           '--config.model.ffn_dim=32')
  assert status == 2 and 'imported parameter' in err and 'override' in err
  assert not os.path.exists(tmp_path / 'w' / 'config.json')


@pytest.mark.slow
def test_the_import_streams_one_tensor_at_a_time(tmp_path):
  """Peak memory of an import (58 MiB float32 and 54 MiB bfloat16 generated checkpoints, each in
  a fresh process): the output and about one param more, far from the 2 x output of reading
  everything, then converting; placed on the device in the checkpoint's dtype."""
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'import_memory.py'),
                           '--small', '--out', str(tmp_path / 'memory.json')],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(tmp_path / 'memory.json') as f:
    measured = json.load(f)
  for case, numbers in measured.items():  # each checkpoint, then the bfloat16 one as float32
    assert numbers['output_bytes'] >= 50 * 2**20
    assert numbers['growth_bytes'] < 1.5 * numbers['output_bytes']
    placed = numbers['device']['live_arrays_bytes']
    if case == 'bfloat16_as_float32':  # every bfloat16 param doubled, the routers as they were
      assert placed == 2 * numbers['output_bytes'] - numbers['float32_router_bytes']
    else:  # the import's own dtypes
      assert placed == numbers['output_bytes']
  assert [measured[dtype]['param_dtype'] for dtype in ('float32', 'bfloat16')] == [
      'float32', 'bfloat16']


def test_an_import_is_placed_on_a_mesh_with_the_experts_sharded(tmp_path, tfds_dir):
  from moejax.convert.workdir import import_hf
  from moejax.train.config import saved_config
  from moejax.train.resume import load
  workdir = str(tmp_path / 'olmoe')
  import_hf(os.path.join(FIXTURES, 'olmoe'), workdir, None, [
      ('data.source', os.path.join(REPO, 'data', 'timemachine.txt')),
      ('data.data_dir', str(tfds_dir)), ('data.length', '32'), ('mesh.expert', '4'),
      ('mesh.data', '2'), ('eval.batch_size', '8'), ('train.batch_size', '8')])
  _, state = load(saved_config(workdir), workdir)
  _, imported = from_hf(os.path.join(FIXTURES, 'olmoe'))
  experts = state.params['decoder']['unit_0']['block_0']['moe']['experts']['wi']  # [8, D, F]
  assert len(experts.sharding.device_set) == 8
  assert {shard.data.shape[0] for shard in experts.addressable_shards} == {2}  # 8 experts / 4
  restored = dict(_leaves(state.params))
  for key, array in _leaves(imported):
    assert array.tobytes() == restored[key].tobytes(), key
