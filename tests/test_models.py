"""Models: MoE layouts, FLOP-matched dense twins, scan == loop, causality, padding, config errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moejax.models import ModelConfig, make_model, per_token_flops
from moejax.train.inputs import dummy_batch, model_inputs

TINY = dict(vocab_size=40, num_layers=4, model_dim=32, num_heads=2, ffn_dim=64, num_experts=4)


def _init(config, batch=2, length=16, seed=0):
  model = make_model(config)
  batch = dummy_batch(config, batch, length)
  batch['targets'] = jax.random.randint(jax.random.key(seed), batch['targets'].shape, 3, 40)
  if 'inputs' in batch:
    batch['inputs'] = jax.random.randint(jax.random.key(seed + 1), batch['inputs'].shape, 3, 40)
  init = jax.jit(lambda b: model.init(jax.random.key(0), *model_inputs(config, b), True))
  return model, nn.unbox(init(batch)['params']), batch


def _paths(params):
  return ['/'.join(k) for k in traverse_util.flatten_dict(params)]


@pytest.mark.parametrize('moe_every,sparse_blocks', [(2, [1, 3]), (1, [0, 1, 2, 3]), (3, [2]),
                                                     (0, [])])
def test_layout_puts_moe_in_every_nth_block(moe_every, sparse_blocks):
  config = ModelConfig(**TINY, moe_every=moe_every)
  assert [i for i in range(4) if config.is_sparse(i)] == sparse_blocks
  params = jax.eval_shape(lambda: _init(config)[1])
  routers = [p for p in _paths(params) if p.endswith('moe/router/dense/kernel')]
  assert len(routers) == len(sparse_blocks)


def test_dense_baseline_has_ffn_of_width_k_times_f_in_sparse_slots():
  config = ModelConfig(**TINY, moe_every=2, num_selected_experts=2, dense_baseline=True)
  _, params, _ = _init(config)
  assert not [p for p in _paths(params) if '/moe/' in p]
  wi = {p: v.shape for p, v in traverse_util.flatten_dict(params, sep='/').items()
        if p.endswith('mlp/wi/kernel')}
  assert wi['decoder/unit_0/block_1/mlp/wi/kernel'] == (32, 2 * 64)  # sparse slot: K * F
  assert wi['decoder/unit_0/block_0/mlp/wi/kernel'] == (32, 64)      # dense block: F


def _forward_flops(config, batch=4, length=32):
  model, params, batch = _init(config, batch, length)
  apply = jax.jit(lambda p, b: model.apply({'params': p}, *model_inputs(config, b), True))
  cost = apply.lower(params, batch).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops'] / (4 * 32)


@pytest.mark.parametrize('k', [1, pytest.param(2, marks=pytest.mark.slow)])
def test_dense_twin_has_the_same_per_token_flops(k):
  # Capacity factor 1 makes the experts' buffers hold exactly the S * K routed tokens.
  moe = ModelConfig(**{**TINY, 'num_layers': 2}, num_selected_experts=k, dispatch='indices',
                    eval_capacity_factor=1.0, min_expert_capacity=1)
  dense = ModelConfig(**{**moe.to_dict(), 'dense_baseline': True})
  by_formula = per_token_flops(moe, 32), per_token_flops(dense, 32)
  compiled = _forward_flops(moe), _forward_flops(dense)
  assert by_formula[0] > by_formula[1]  # the router's 2 * D * E
  np.testing.assert_allclose(*by_formula, rtol=0.02)
  np.testing.assert_allclose(*compiled, rtol=0.02)
  # The formula counts the matmuls; XLA adds norms and softmaxes on top (<10% at this width).
  np.testing.assert_allclose(by_formula[1], compiled[1], rtol=0.1)
  # A sparse layer has K times the expert FLOPs of one expert: the twin is not just any model.
  one_expert = per_token_flops(ModelConfig(**{**moe.to_dict(), 'num_selected_experts': 1}), 32)
  assert k == 1 or by_formula[0] - one_expert > 0.1 * one_expert


def _stack_units(params, num_units):
  """Unrolled params (unit_0, unit_1, ...) -> the nn.scan layout (units, leading unit axis)."""
  def convert(stack):
    units = [stack.pop(f'unit_{i}') for i in range(num_units)]
    stack['units'] = jax.tree.map(lambda *a: jnp.stack(a), *units)
    return stack
  params = jax.tree.map(lambda a: a, params)
  return {k: convert(v) if k in ('encoder', 'decoder') else v for k, v in params.items()}


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['decoder', 'encoder_decoder'])
def test_scan_and_remat_give_the_loop_numbers(kind):
  loop_cfg = ModelConfig(**TINY, kind=kind)
  scan_cfg = ModelConfig(**TINY, kind=kind, scan_layers=True, remat=True)
  model, params, batch = _init(loop_cfg)
  scan_model = make_model(scan_cfg)
  scan_params = _stack_units(params, 2)
  assert (jax.tree.map(jnp.shape, scan_params) == jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(
      lambda: scan_model.init(jax.random.key(0), *model_inputs(scan_cfg, batch), True))['params'])))
  grad = lambda m, cfg: jax.jit(jax.grad(lambda p: jnp.mean(m.apply(
      {'params': p}, *model_inputs(cfg, batch), False) ** 2)))
  expected = grad(model, loop_cfg)(params)
  actual = grad(scan_model, scan_cfg)(scan_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
               _stack_units(expected, 2), actual)


def test_decoder_never_looks_at_later_tokens_even_when_experts_overflow():
  # All-sparse, 4 experts, capacity factor 0.5: many tokens dropped, in sequence order.
  config = ModelConfig(**TINY, moe_every=1, train_capacity_factor=0.5, min_expert_capacity=1,
                       num_selected_experts=2)
  model, params, batch = _init(config, batch=2, length=16)
  changed = dict(batch, targets=batch['targets'].at[:, 10:].set(7))
  apply = jax.jit(lambda p, b: model.apply({'params': p}, *model_inputs(config, b), False,
                                           mutable=['intermediates'])[0])
  logits = [apply(params, b) for b in (batch, changed)]
  # Decoder inputs are the targets shifted right: positions <= 10 see targets < 10 only.
  np.testing.assert_array_equal(logits[0][:, :11], logits[1][:, :11])
  assert not np.allclose(logits[0][:, 12:], logits[1][:, 12:])


@pytest.mark.slow
def test_encoder_padding_is_ignored():
  config = ModelConfig(**TINY, kind='encoder_decoder')
  model, params, batch = _init(config)
  mask = jnp.arange(16)[None, :] < jnp.array([[16], [9]])
  batch = dict(batch, input_mask=mask.astype(jnp.float32))
  changed = dict(batch, inputs=jnp.where(mask, batch['inputs'], 5))
  out = [model.apply({'params': params}, *model_inputs(config, b), True) for b in (batch, changed)]
  np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = ModelConfig(**TINY, dtype='bfloat16')
  model, params, batch = _init(config)
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits = model.apply({'params': params}, *model_inputs(config, batch), True)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize('fields,message', [
    (dict(kind='gpt'), 'model.kind'),
    (dict(num_heads=3), 'model.num_heads'),
    (dict(moe_every=3, scan_layers=True), 'model.num_layers'),
    (dict(num_selected_experts=5), 'model.num_selected_experts'),
    (dict(dtype='float16'), 'model.dtype'),
    (dict(num_kv_heads=3, num_heads=4), 'model.num_kv_heads'),
    (dict(rope_theta=0.0), 'model.rope_theta'),
    (dict(norm_eps=-1e-6), 'model.norm_eps'),
])
def test_bad_model_config_names_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**{**TINY, **fields})


def test_grouped_query_attention_is_attention_with_each_key_value_head_repeated():
  """2 key/value heads serving 4 query heads give the numbers of 4 heads whose key and value
  kernels repeat each of the 2 (heads 0, 1 share the first; 2, 3 the second)."""
  base = dict(TINY, num_heads=4, head_dim=8, moe_every=1, rope_theta=1e6)
  grouped = ModelConfig(**base, num_kv_heads=2)
  model, params, batch = _init(grouped)
  full = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.repeat(x, 2, axis=1) if str(path[-2].key) in ('key', 'value') else x,
      params)
  logits = model.apply({'params': params}, *model_inputs(grouped, batch), True)
  full_model = make_model(ModelConfig(**base))
  expected = full_model.apply({'params': full}, *model_inputs(grouped, batch), True)
  np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_unknown_model_field_is_named():
  with pytest.raises(ValueError, match='num_expert'):
    ModelConfig.from_dict({**TINY, 'num_expert': 3})


@pytest.mark.slow
def test_soft_moe_encoder_flops_by_formula_match_the_compiled_model():
  """per_token_flops counts an encoder's Soft MoE layers (slot logits, dispatch, combine and
  E * P / S expert FFNs per token): the formula's difference between a Soft MoE encoder with
  4 x 4 slots and one with 4 x 1 slots is XLA's."""
  def both(slots):
    config = ModelConfig(**{**TINY, 'num_layers': 2}, kind='encoder_decoder', soft_moe=True,
                         slots_per_expert=slots)
    return per_token_flops(config, 32, 32), _forward_flops(config)
  few, many = both(1), both(4)
  by_formula, compiled = many[0] - few[0], many[1] - few[1]
  assert by_formula > 0
  # The formula counts matmuls; XLA also counts the two softmaxes over the slots (6% here).
  np.testing.assert_allclose(by_formula, compiled, rtol=0.1)
  assert compiled > by_formula
