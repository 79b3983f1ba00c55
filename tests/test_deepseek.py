"""DeepSeek-V2 and -V3, and GLM-4.5 (V3's routing), against transformers 4.57.6 (tiny random
models made by tools/make_deepseek_fixtures.py): logits, router probabilities, chosen experts
and their weights; the FP8 weights dequantized as the fixture script did; import -> export ->
import bit for bit, the correction biases included; an imported correction bias keeps moving
when fine-tuned. The published configs: tests/test_hub_configs.py."""
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, _layer_order
from moejax import collect_decisions, collect_router_probs
from moejax.balancing import BIAS_COLLECTION, update_balancing_biases
from moejax.convert import from_hf_variables, to_hf
from moejax.convert.fp8 import Fp8Checkpoint, dequantize
from moejax.convert.hf import hub_model_type
from moejax.convert.safetensors import Checkpoint
from moejax.models import make_model

FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'hf')
# deepseek_v3: sigmoid, groups, correction bias, MLA with a query latent, YaRN; glm4_moe: the
# same routing under grouped-query attention with biases, QK-norm and partial rotary.
FAST = ('deepseek_v3', 'glm4_moe')
NAMES = ('deepseek_v2', 'deepseek_v2_grouped', 'deepseek_v3', 'deepseek_v3_fp8', 'glm4_moe')


def _leaves(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, (*prefix, key))
    else:
      yield (*prefix, key), value


@pytest.mark.parametrize('name', [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NAMES])
def test_imported_model_gives_the_reference_outputs(name):
  """Logits to 1e-4, router probabilities and combine weights to 1e-5, the same experts in the
  same order (best choice score first); V3's imported biases then move by the rate against the
  load (an expert at the mean load stays)."""
  config, variables = from_hf_variables(os.path.join(FIXTURES, name))
  reference = dict(np.load(os.path.join(FIXTURES, name, 'reference.npz')))
  ids = jnp.asarray(reference['input_ids'])
  logits, state = jax.jit(lambda v: make_model(config).apply(
      v, ids, jnp.ones(ids.shape, bool), True,
      mutable=['decisions', BIAS_COLLECTION]))(variables)
  np.testing.assert_allclose(logits, reference['logits'], atol=1e-4, rtol=0)
  probs, decisions = collect_router_probs(state), collect_decisions(state)
  layers = sorted(probs, key=_layer_order)
  assert len(layers) == len(reference['experts'])
  flat = lambda x: np.asarray(x).reshape(-1, x.shape[-1])
  for i, layer in enumerate(layers):
    np.testing.assert_allclose(flat(probs[layer]), reference['router_probs'][i], atol=1e-5)
    np.testing.assert_array_equal(flat(decisions[layer].expert_index), reference['experts'][i])
    np.testing.assert_allclose(flat(decisions[layer].weight), reference['weights'][i], atol=1e-5)
  if BIAS_COLLECTION in variables:  # V3: the imported bias, then a fine-tuning step's update
    before = dict(_leaves(variables[BIAS_COLLECTION]))
    updated = update_balancing_biases(state[BIAS_COLLECTION], config.balancing_bias_rate)
    after = dict(_leaves(updated))
    for path, bias in before.items():
      assert np.abs(bias).max() > 0.01  # drawn by the fixture script, not zeros
      moved = np.abs(after[path] - bias) / config.balancing_bias_rate  # 1, or 0 at the mean load
      assert moved.max() > 0.999 and np.all((moved < 1e-3) | (np.abs(moved - 1) < 1e-3))


def test_fp8_weights_dequantize_as_the_fixture_script_did():
  """Every FP8 weight times its 16 x 16 block scales (partial blocks at the edges) equals the
  script's torch dequantization bit for bit; unquantized tensors are read as they are."""
  directory = os.path.join(FIXTURES, 'deepseek_v3_fp8')
  reference = np.load(os.path.join(directory, 'reference.npz'))
  fp8, raw = Fp8Checkpoint(directory), Checkpoint(directory)
  names = [key.split('/', 1)[1] for key in reference if key.startswith('dequantized/')]
  assert len(names) > 20
  for name in names:
    assert raw.tensor(name).dtype.name == 'float8_e4m3fn'
    np.testing.assert_array_equal(fp8.tensor(name), reference[f'dequantized/{name}'])
  np.testing.assert_array_equal(fp8.tensor('model.embed_tokens.weight'),
                                raw.tensor('model.embed_tokens.weight'))
  # By hand: a [3, 2] weight in blocks of 2 x 2, the last row a partial block.
  weight = np.array([[1, 2], [3, 4], [5, 6]], np.float32).astype(fp8.checkpoint.tensor(
      names[0]).dtype)
  np.testing.assert_array_equal(dequantize(weight, np.array([[0.5], [4.0]], np.float32), (2, 2)),
                                [[0.5, 1], [1.5, 2], [20, 24]])


@pytest.mark.parametrize('name', ['deepseek_v2_grouped', 'deepseek_v3', 'glm4_moe'])
def test_import_export_import_is_bit_exact(name, tmp_path):
  """The export writes every hub tensor back as it was (the rotary rows put back in DeepSeek's
  interleaved order, the correction biases from the state), and re-imports to the same model."""
  source = os.path.join(FIXTURES, name)
  config, variables = from_hf_variables(source)
  params = variables.pop('params')
  to_hf(config, params, str(tmp_path), hub_model_type(source), state=variables)
  again_config, again = from_hf_variables(str(tmp_path))
  assert again_config == config
  expected = dict(_leaves({'params': params, **variables}))
  got = dict(_leaves(again))
  assert expected.keys() == got.keys()
  for path, array in expected.items():
    np.testing.assert_array_equal(got[path], array, err_msg=str(path))
  original, exported = Checkpoint(source), Checkpoint(str(tmp_path))
  for tensor_name in exported.names():
    np.testing.assert_array_equal(exported.tensor(tensor_name), original.tensor(tensor_name),
                                  err_msg=tensor_name)


def test_the_multi_token_prediction_layer_is_left_out_in_one_warning():
  source = os.path.join(FIXTURES, 'published', 'deepseek-ai__DeepSeek-V3')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    config, variables = from_hf_variables(source)
  messages = [str(w.message) for w in caught]
  assert messages == ['deepseek_v3 checkpoint: its 1 multi-token-prediction layer(s) are left '
                      'out']
  assert config.num_layers == 4 and 'model.layers.4.eh_proj.weight' in Checkpoint(source)


@pytest.mark.slow
def test_an_imported_run_keeps_the_correction_biases_and_exports_them(tmp_path, tfds_dir):
  """import-hf puts V3's correction biases in the run's balancing-bias state (its loads at zero);
  export-hf writes them back as they were."""
  from moejax.convert.workdir import export_hf, import_hf
  from moejax.train.config import saved_config
  from moejax.train.resume import load
  source, workdir = os.path.join(FIXTURES, 'deepseek_v3'), str(tmp_path / 'run')
  import_hf(source, workdir, None, [
      ('data.source', os.path.join(REPO, 'data', 'timemachine.txt')),
      ('data.data_dir', str(tfds_dir)), ('data.length', '32')])
  _, variables = from_hf_variables(source)
  _, state = load(saved_config(workdir), workdir)
  saved = dict(_leaves(jax.device_get(state.balancing_bias_state)))
  for path, bias in _leaves(variables[BIAS_COLLECTION]):
    np.testing.assert_array_equal(saved[path], bias)
    np.testing.assert_array_equal(saved[(*path[:-1], 'load')], 0)
  export_hf(workdir, str(tmp_path / 'out'), saved_config(workdir), None, None, None)
  original, exported = Checkpoint(source), Checkpoint(str(tmp_path / 'out'))
  assert exported.names() == original.names()
  for name in original.names():
    np.testing.assert_array_equal(exported.tensor(name), original.tensor(name), err_msg=name)
