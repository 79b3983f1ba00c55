"""`ModelConfig.param_dtype`: params stored in bfloat16 (the routers' in float32), an import that
keeps its checkpoint's dtype (so its params take the checkpoint's bytes), bfloat16 logits and
greedy samples against float32 ones on the Hugging Face fixtures (tests/fixtures/hf, converted
to bfloat16 here with moejax's own export), and a train step on a float32 master copy."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from helpers import REPO
from moejax.convert import from_hf, to_hf
from moejax.convert.safetensors import Checkpoint, write_safetensors
from moejax.convert.workdir import _placed
from moejax.models import ModelConfig, make_model
from moejax.train import default_config, init_state, make_optimizer, make_train_step
from moejax.train.inputs import dummy_batch
from moejax.train.optim import float32_master
from moejax.train.sampling import generate

FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'hf')
FAMILIES = ['mixtral', 'olmoe', 'qwen2_moe', 'switch_transformers']
BF16 = np.dtype(ml_dtypes.bfloat16)
TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, ffn_dim=32, num_experts=4,
            num_selected_experts=2, moe_every=2)


def _paths(tree):
  return {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _model_args(config, ids):
  """The model's inputs for ids [B, L] (the encoder reads them reversed)."""
  mask = jnp.ones(ids.shape, jnp.bool_)
  return (ids[:, ::-1], mask, ids, mask) if config.kind == 'encoder_decoder' else (ids, mask)


def _init_shapes(config, ids):
  return jax.eval_shape(lambda: make_model(config).init(
      jax.random.key(0), *_model_args(config, ids), True))['params']


@pytest.fixture(scope='module')
def bf16_hub(tmp_path_factory):
  """family -> a hub directory holding its fixture cast to bfloat16, written by `to_hf`."""
  out = {}
  for family in FAMILIES:
    config, params = from_hf(os.path.join(FIXTURES, family))
    directory = str(tmp_path_factory.mktemp(family))
    to_hf(config, jax.tree.map(lambda x: np.asarray(x, BF16), params), directory, family)
    out[family] = directory
  return out


@pytest.mark.parametrize('kind', ['decoder', 'encoder_decoder'])
def test_every_param_is_stored_in_param_dtype_but_the_routers(kind):
  extra = (dict(num_shared_experts=1, shared_expert_gate=True, attention_bias=True, qk_norm=True)
           if kind == 'decoder' else dict(soft_moe=True, positions='relative'))
  config = ModelConfig(**TINY, kind=kind, param_dtype='bfloat16', **extra)
  dtypes = {path: leaf.dtype for path, leaf in
            _paths(_init_shapes(config, jnp.zeros((1, 8), jnp.int32))).items()}
  # Float32: the routers (a decoder's MoE layers', and the Soft MoE encoder's phi and scale).
  float32 = {p for p in dtypes if "['router']" in p or p.endswith(("['phi']", "['scale']"))
             and "['moe']" in p}
  assert float32 and all(dtypes[p] == jnp.float32 for p in float32)
  assert all(dtypes[p] == jnp.bfloat16 for p in set(dtypes) - float32), dtypes
  assert ModelConfig(**TINY).param_dtype == 'float32'
  with pytest.raises(Exception, match=r"^model\.param_dtype='float16' is invalid"):
    ModelConfig(**TINY, param_dtype='float16')


@pytest.mark.parametrize('dtype', [pytest.param('float32', marks=pytest.mark.slow), 'bfloat16'])
def test_bfloat16_params_compute_as_the_same_values_in_float32(dtype):
  """param_dtype changes storage only: the model on bfloat16 params gives exactly what the
  float32 model gives on the same values upcast, in either compute dtype."""
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  low = ModelConfig(**TINY, num_shared_experts=1, param_dtype='bfloat16', dtype=dtype)
  high = dataclasses.replace(low, param_dtype='float32')
  shapes = _init_shapes(high, ids)  # random float32 params, then in the dtypes `low` stores
  keys = jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes)))
  params = jax.tree.unflatten(jax.tree.structure(shapes), [
      jax.random.normal(key, s.shape) * 0.5 for key, s in zip(keys, jax.tree.leaves(shapes))])
  stored = jax.tree.map(lambda x, s: x.astype(s.dtype), params, _init_shapes(low, ids))
  upcast = jax.tree.map(lambda x: x.astype(jnp.float32), stored)
  apply = lambda config, params: make_model(config).apply({'params': params},
                                                          *_model_args(config, ids), True)
  expected, got = apply(high, upcast), apply(low, stored)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, expected)


def test_a_bfloat16_import_takes_the_checkpoints_bytes_plus_its_float32_routers(bf16_hub):
  directory = bf16_hub['mixtral']
  with open(os.path.join(directory, 'config.json')) as f:
    assert json.load(f)['torch_dtype'] == 'bfloat16'
  checkpoint = Checkpoint(directory)
  assert {checkpoint.tensor(name).dtype for name in checkpoint.names()} == {BF16}
  checkpoint_bytes = sum(checkpoint.tensor(name).nbytes for name in checkpoint.names())
  config, params = from_hf(directory)
  assert config.param_dtype == 'bfloat16' and config.dtype == 'float32'  # compute: separate
  ids = jnp.zeros((1, 8), jnp.int32)
  assert jax.tree.map(lambda x: x.dtype, params) == jax.tree.map(
      lambda s: np.dtype(s.dtype), _init_shapes(config, ids))
  # What `moejax import-hf` places: the fresh state's dtypes, no cast.
  fresh = jax.jit(lambda: make_model(config).init(jax.random.key(0), ids,
                                                  jnp.ones((1, 8), bool), True)['params'])()
  placed = _placed(params, fresh)
  routers = [x for path, x in _paths(placed).items() if "['router']" in path]
  assert {x.dtype for x in routers} == {jnp.dtype(jnp.float32)}
  device_bytes = sum(x.nbytes for x in jax.tree.leaves(placed))
  # Mixtral fixture: 60,064 params, 256 of them the 2 routers' (D 32 x E 4 each): 2 bytes each
  # in the checkpoint, the routers' 2 more each on the devices.
  assert checkpoint_bytes == 120_128 == 2 * 60_064
  assert device_bytes == checkpoint_bytes + 2 * sum(x.size for x in routers) == 120_640
  assert jax.tree.map(lambda x: x.dtype, placed) == jax.tree.map(lambda x: x.dtype, fresh)
  for path, x in _paths(placed).items():
    np.testing.assert_array_equal(np.asarray(x), _paths(params)[path])


@pytest.mark.parametrize('family', FAMILIES)
def test_a_bfloat16_import_has_the_models_dtypes_and_exports_bit_for_bit(family, bf16_hub,
                                                                         tmp_path):
  config, params = from_hf(bf16_hub[family])
  assert config.param_dtype == 'bfloat16'
  ids = jnp.zeros((1, 8), jnp.int32)  # every param in the dtype the model creates it in
  assert jax.tree.map(lambda x: x.dtype, params) == jax.tree.map(
      lambda s: np.dtype(s.dtype), _init_shapes(config, ids))
  to_hf(config, params, str(tmp_path), family)
  original, exported = Checkpoint(bf16_hub[family]), Checkpoint(str(tmp_path))
  assert exported.names() == original.names()
  for name in original.names():
    a, b = original.tensor(name), exported.tensor(name)
    assert a.dtype == b.dtype == BF16 and a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize('cast, expected', [('experts', 'bfloat16'), ('all_float16', 'float32')])
def test_the_checkpoints_expert_weights_decide_its_dtype(cast, expected, tmp_path):
  """A checkpoint mixing dtypes takes its experts' (others cast to it); float16 becomes float32
  (exactly)."""
  source = Checkpoint(os.path.join(FIXTURES, 'mixtral'))
  def dtype(name):
    if cast == 'all_float16':
      return np.dtype(np.float16)
    return BF16 if '.experts.' in name else np.dtype(np.float32)
  shapes = {name: (source.tensor(name).shape, dtype(name)) for name in source.names()}
  write_safetensors(str(tmp_path / 'model.safetensors'),
                    ((name, source.tensor(name).astype(dtype(name))) for name in shapes), shapes)
  with open(os.path.join(FIXTURES, 'mixtral', 'config.json')) as f:
    hub = json.load(f)  # it says "dtype": "float32": the tensors decide
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(hub, f)
  config, params = from_hf(str(tmp_path))
  assert config.param_dtype == expected
  for path, x in _paths(params).items():
    assert x.dtype == (np.float32 if "['router']" in path else config.storage_dtype), path
  name = 'model.layers.0.post_attention_layernorm.weight'  # float32 or float16 there
  expected = source.tensor(name).astype(dtype(name)).astype(config.storage_dtype)
  np.testing.assert_array_equal(params['decoder']['unit_0']['block_0']['pre_ffn_norm']['scale'],
                                expected)


# Largest |logit difference| over the fixtures' reference inputs (2 x 12 tokens, 260 logits of
# magnitude up to 4-6) between bfloat16 and transformers 4.57.6's float32 logits (which the
# float32 import matches to 4e-6), measured on XLA:CPU:
#   family               bf16 params, f32 compute   bf16 params and compute (mean |diff|)
#   mixtral              0.080                      0.143 (0.0126)
#   olmoe                0.028                      0.073 (0.0091)
#   qwen2_moe            0.036                      0.055 (0.0086)
#   switch_transformers  0.019                      0.032 (0.0058)
# Asserted: those plus about a quarter. Mixtral's are the largest: one of its 48 tokens takes
# another expert pair in bfloat16 (the expert choices agree on 47 of 48).
LOGIT_BOUNDS = {'mixtral': (0.1, 0.18), 'olmoe': (0.035, 0.09), 'qwen2_moe': (0.045, 0.07),
                'switch_transformers': (0.025, 0.04)}


@pytest.mark.parametrize('family', [  # make test-fast keeps Mixtral's
    pytest.param(f, marks=() if f == 'mixtral' else pytest.mark.slow) for f in FAMILIES])
def test_bfloat16_logits_agree_with_float32_within_the_measured_bound(family, bf16_hub):
  reference = dict(np.load(os.path.join(FIXTURES, family, 'reference.npz')))
  high, _ = from_hf(os.path.join(FIXTURES, family))
  _, params = from_hf(bf16_hub[family])
  args = [jnp.asarray(reference['input_ids'])]
  args.append(jnp.ones(args[0].shape, bool))
  if high.kind == 'encoder_decoder':
    args += [jnp.asarray(reference['decoder_input_ids'])]
    args.append(jnp.ones(args[2].shape, bool))
  for bound, dtype in zip(LOGIT_BOUNDS[family], ('float32', 'bfloat16')):
    low = dataclasses.replace(high, param_dtype='bfloat16', dtype=dtype)
    logits = make_model(low).apply({'params': params}, *args, True)
    assert np.abs(np.asarray(logits) - reference['logits']).max() < bound, dtype


@pytest.mark.slow
def test_bfloat16_greedy_samples_agree_with_float32_where_measured(bf16_hub):
  """Mixtral fixture, prompt [164, 142, 146, 242], 64-token window: bfloat16 (params and
  compute) and float32 greedy samples were measured equal for all 40 tokens; the first 23 are
  asserted (float32's top-2 margin >= 0.10 on each: a random tiny model's next-token
  distribution is flat, and later tokens have near-ties, 0.005 at token 36; other prompts part
  after 0, 10, 16 or 20 tokens, each time at a margin under 0.7 that the bfloat16 rounding,
  or a token routed to other experts, tips)."""
  high, high_params = from_hf(os.path.join(FIXTURES, 'mixtral'))
  _, low_params = from_hf(bf16_hub['mixtral'])
  low = dataclasses.replace(high, param_dtype='bfloat16', dtype='bfloat16')
  prompt = np.asarray([164, 142, 146, 242])
  expected = generate(make_model(high), high_params, prompt, 23, 64, 0.0, 0, cache=False)
  got = generate(make_model(low), low_params, prompt, 23, 64, 0.0, 0, cache=False)
  np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_a_train_step_on_bfloat16_params_updates_them_through_a_float32_master_copy():
  config = ModelConfig(**TINY, param_dtype='bfloat16')
  train = default_config().train
  train.update(schedule='constant', learning_rate=1e-3)
  model, tx = make_model(config), make_optimizer(train, config.param_dtype)
  batch = dummy_batch(config, 2, 16)
  batch['targets'] = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  state = jax.jit(lambda: init_state(model, tx, batch, seed=0))()
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = make_train_step(model, tx, 0.01, 0.001)(state, batch)
  assert int(metrics['skipped']) == 0
  master = _paths(state.opt_state.master)
  for path, new in _paths(state.params).items():
    old = _paths(before)[path]
    if "['router']" in path:  # float32: no copy
      assert new.dtype == jnp.float32 and path not in master, path
      assert not np.array_equal(new, old), path
      continue
    assert new.dtype == jnp.bfloat16, path
    assert not np.array_equal(master[path], old.astype(np.float32)), path  # every copy moved
    np.testing.assert_array_equal(new, master[path].astype(jnp.bfloat16), path)
    # The norm scales' 1.0 - 1e-3 rounds back to 1.0 (half a bfloat16 ulp there is 2^-9);
    # every other param moved in bfloat16 too.
    assert np.array_equal(new, old) == path.endswith("['scale']"), path
  moments = state.opt_state.inner[1][0]  # clip's state, then adamw's chain: scale_by_adam's
  assert {x.dtype for x in jax.tree.leaves((moments.mu, moments.nu))} == {jnp.dtype(jnp.float32)}


def test_the_master_copy_keeps_updates_a_bfloat16_param_would_round_away():
  """Adam at lr 1e-4 on a param of 1.0: each step (about 1e-4) is under half a bfloat16 ulp
  there (2^-9), so the bfloat16 param alone never moves; with the master copy, 50 steps move it
  to 0.995, stored as 0.99609375."""
  params = {'w': jnp.ones((4,), jnp.bfloat16)}
  grads = {'w': jnp.ones((4,), jnp.bfloat16)}
  def run(tx, steps=50):
    state, p = tx.init(params), params
    for _ in range(steps):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p, state
  alone, _ = run(optax.adam(1e-4))
  assert alone['w'].dtype == jnp.bfloat16 and np.all(np.asarray(alone['w'], np.float32) == 1.0)
  kept, state = run(float32_master(optax.adam(1e-4)))
  np.testing.assert_allclose(state.master['w'], 0.995, atol=1e-5)
  assert kept['w'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(kept['w'], np.float32), 0.99609375)
