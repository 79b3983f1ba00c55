"""Every MoeLayer option reaches a model through ModelConfig: one test per option, each checking
the option's defining property in a model (read from the routing decisions the layers sow)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_decoding_matches_the_window
from moejax import ConfigError, ModelConfig, MoeLayer, collect_aux_losses, collect_decisions
from moejax.models import make_model
from moejax.models.config import MOE_DEFAULTS, MOE_FIELDS_SET_BY_MODEL
from moejax.train.config import default_config
from moejax.train.inputs import model_inputs, shift_right

V, B, L = 64, 4, 16


def _config(**fields):
  return ModelConfig(**{**dict(vocab_size=V, num_layers=2, model_dim=32, num_heads=2, ffn_dim=32,
                               num_experts=4, moe_every=2), **fields})


def _batch(seed=0):
  keys = jax.random.split(jax.random.key(seed))
  return {'targets': jax.random.randint(keys[0], (B, L), 3, V),
          'weights': jnp.ones((B, L)),
          'inputs': jax.random.randint(keys[1], (B, L), 3, V),
          'input_mask': jnp.ones((B, L))}


def _run(config, deterministic=True, params=None, seed=0):
  """(logits, params, decisions by layer, intermediates) of one forward pass."""
  model, batch = make_model(config), _batch(seed)
  inputs = model_inputs(config, batch)
  if params is None:
    params = model.init(jax.random.key(0), *inputs, True)['params']
  rngs = {name: jax.random.key(i) for i, name in enumerate(('dropout', 'jitter', 'gating'))}
  logits, state = model.apply({'params': params}, *inputs, deterministic, rngs=rngs,
                              mutable=['intermediates', 'decisions'])
  return logits, params, collect_decisions(state), state['intermediates']


def test_the_moe_fields_are_the_layers_own():
  layer_fields = {f.name: f.default for f in dataclasses.fields(MoeLayer)
                  if f.name not in ('parent', 'name')}
  model_fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  for name, default in layer_fields.items():
    if name in MOE_FIELDS_SET_BY_MODEL:
      continue
    assert model_fields[name] == MOE_DEFAULTS.get(name, default), name
  assert ModelConfig(vocab_size=V).dispatch == MoeLayer.dispatch == 'auto'
  assert set(default_config().model) == set(model_fields)
  assert default_config().model.vocab_size is None  # the tokenizer's, unless a config sets it


def test_the_config_checks_by_the_layers_rules_and_names_the_model_field():
  with pytest.raises(ConfigError, match=r"^model\.top_p=0\.0 is invalid"):
    _config(top_p=0.0, num_selected_experts=2)
  with pytest.raises(ConfigError, match=r"^model\.ffn_dim="):
    _config(ffn_dim=0)
  with pytest.raises(ConfigError, match=r"^model\.router='gumbel'"):
    _config(router='gumbel', num_selected_experts=2)
  with pytest.raises(ConfigError, match=r"^model\.group_size='8' is invalid: it must be int"):
    _config(group_size='8')


@pytest.mark.slow
def test_experts_choose_fills_every_expert_of_the_encoder_and_a_decoder_refuses_it():
  config = _config(kind='encoder_decoder', routing='experts_choose', eval_capacity_factor=1.0)
  _, _, decisions, _ = _run(config)
  encoder, decoder = decisions['encoder/unit_0/block_1'], decisions['decoder/unit_0/block_1']
  capacity = encoder.capacity  # ceil(1.0 * 16 * 1 / 4) = 4 of the 16 tokens of a group
  assert encoder.expert_index.shape == (B, L, 4) and capacity == 4
  per_expert = np.asarray(encoder.dispatched).sum(axis=1)  # [G, E]
  np.testing.assert_array_equal(per_expert, capacity)  # every expert full, in every group
  assert decoder.expert_index.shape == (B, L, 1)  # the decoder routes tokens-choose
  with pytest.raises(ConfigError, match=r"^model\.routing='experts_choose'.*encoder"):
    _config(routing='experts_choose')


def _dropped_before_dispatched(decision) -> bool:
  """Whether some token lost its slot while a later token of the group took the same expert."""
  expert, dispatched = np.asarray(decision.expert_index[..., 0]), np.asarray(
      decision.dispatched[..., 0])
  chosen = np.asarray(decision.chosen[..., 0])
  for g in range(expert.shape[0]):
    for e in range(decision.num_experts):
      mine = (expert[g] == e) & chosen[g]
      dropped, kept = np.flatnonzero(mine & ~dispatched[g]), np.flatnonzero(mine & dispatched[g])
      if dropped.size and kept.size and dropped.min() < kept.max():
        return True
  return False


@pytest.mark.slow
def test_batch_prioritized_orders_the_encoder_by_confidence_and_a_decoder_refuses_it():
  config = _config(kind='encoder_decoder', batch_prioritized=True, eval_capacity_factor=0.5,
                   min_expert_capacity=1, router_init_scale=10.0)
  _, _, decisions, _ = _run(config)
  assert _dropped_before_dispatched(decisions['encoder/unit_0/block_1'])
  assert not _dropped_before_dispatched(decisions['decoder/unit_0/block_1'])  # sequence order
  with pytest.raises(ConfigError, match=r'^model\.batch_prioritized=True'):
    _config(batch_prioritized=True)


@pytest.mark.slow
def test_random_routing_drops_second_choices_in_training_only():
  config = _config(num_selected_experts=2, random_routing=True)
  _, params, train, _ = _run(config, deterministic=False)
  _, _, evaluation, _ = _run(config, deterministic=True, params=params)
  second = np.asarray(train['decoder/unit_0/block_1'].chosen[..., 1])
  assert 0 < second.mean() < 1
  assert np.asarray(evaluation['decoder/unit_0/block_1'].chosen).all()


@pytest.mark.slow
def test_router_bias_and_router_dim_shape_the_router():
  _, params, _, _ = _run(_config(router_bias=True))
  router = params['decoder']['unit_0']['block_1']['moe']['router']
  assert router['dense']['bias'].shape == (4,)
  _, params, _, _ = _run(_config(router='cosine', router_dim=8))
  router = params['decoder']['unit_0']['block_1']['moe']['router']
  assert router['projection']['kernel'].shape == (32, 8)


@pytest.mark.slow
def test_gumbel_temperature_changes_the_router_gradient_not_the_forward_pass():
  def loss_and_router_grad(temperature, params=None):
    config = _config(router='gumbel', gumbel_temperature=temperature)
    model, batch = make_model(config), _batch()
    inputs = model_inputs(config, batch)
    params = params or model.init(jax.random.key(0), *inputs, True)['params']

    def loss(params):
      logits = model.apply({'params': params}, *inputs, False,
                           rngs={'gating': jax.random.key(3)}, mutable=['intermediates'])[0]
      return jnp.mean(logits**2)
    value, grads = jax.value_and_grad(loss)(params)
    return value, grads['decoder']['unit_0']['block_1']['moe']['router'], params
  cold, cold_grad, params = loss_and_router_grad(0.5)
  hot, hot_grad, _ = loss_and_router_grad(2.0, params)
  np.testing.assert_allclose(cold, hot, rtol=1e-6)
  assert not np.allclose(cold_grad['dense']['kernel'], hot_grad['dense']['kernel'])


@pytest.mark.slow
def test_block_size_gives_the_same_numbers_and_must_be_a_power_of_two():
  config = _config(dispatch='sorted', block_size=16)
  assert config.moe_layer(causal=True).block_size == 16
  logits, params, _, _ = _run(_config(dispatch='sorted'))
  small, _, _, _ = _run(config, params=params)
  np.testing.assert_allclose(small, logits, rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match=r'^model\.block_size=24'):
    _config(block_size=24)


def test_soft_moe_in_the_encoder_and_a_decoder_refuses_it():
  config = _config(kind='encoder_decoder', soft_moe=True, slots_per_expert=2)
  logits, params, decisions, _ = _run(config)
  assert np.isfinite(logits).all()
  assert params['encoder']['unit_0']['block_1']['moe']['phi'].shape == (32, 4 * 2)  # [D, E * P]
  assert list(decisions) == ['decoder/unit_0/block_1']  # the decoder still routes top-K
  with pytest.raises(ConfigError, match=r'^model\.soft_moe=True'):
    _config(soft_moe=True)


def test_hash_routing_in_a_decoder_sends_equal_token_ids_to_equal_experts():
  config = _config(router='hash', eval_capacity_factor=None)
  _, params, decisions, _ = _run(config)
  assert 'router' not in params['decoder']['unit_0']['block_1']['moe']
  ids = np.asarray(shift_right(_batch()['targets'])).ravel()  # the decoder's input ids
  expert = np.asarray(decisions['decoder/unit_0/block_1'].expert_index).ravel()
  for token in np.unique(ids):
    assert len(set(expert[ids == token])) == 1
  assert len(set(expert)) > 1


def test_bfloat16_router_rounds_the_routing_probabilities():
  def dispatched_weights(router_dtype):
    _, _, decisions, _ = _run(_config(router_dtype=router_dtype))
    decision = decisions['decoder/unit_0/block_1']
    return np.asarray(decision.weight)[np.asarray(decision.dispatched)]
  as_bf16 = lambda w: np.asarray(jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32))
  weights = dispatched_weights('bfloat16')
  np.testing.assert_array_equal(weights, as_bf16(weights))
  weights = dispatched_weights('float32')
  assert (weights != as_bf16(weights)).mean() > 0.5


def test_per_token_load_balancing_scale_is_k_times_per_choice():
  _, params, _, per_choice = _run(_config(num_selected_experts=2))
  _, _, _, per_token = _run(_config(num_selected_experts=2,
                                    load_balancing_loss_scale='per_token'), params=params)
  np.testing.assert_allclose(collect_aux_losses(per_token)['load_balancing_loss'],
                             2 * collect_aux_losses(per_choice)['load_balancing_loss'], rtol=1e-6)


def test_a_fixed_expert_capacity_replaces_the_factors():
  layer = MoeLayer(num_experts=4, ffn_dim=8, expert_capacity=2, train_capacity_factor=1.25,
                   eval_capacity_factor=None)
  assert [layer.capacity(16, d) for d in (True, False)] == [2, 2]
  assert layer.capacity(1, True) == 1  # never more slots than the group's tokens
  with pytest.raises(ValueError, match='MoeLayer.expert_capacity=0'):
    MoeLayer(num_experts=4, ffn_dim=8, expert_capacity=0)


def test_the_shared_expert_gate_scales_the_shared_experts_by_a_sigmoid():
  """With the gate's kernel at zero, sigmoid(0) = 1/2: the gated layer is the routed experts plus
  half the shared one, halfway between the layer without shared experts and the ungated one."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  fields = dict(num_experts=4, ffn_dim=8, num_selected_experts=2, eval_capacity_factor=None)
  gated = MoeLayer(**fields, num_shared_experts=1, shared_expert_gate=True)
  params = gated.init(jax.random.key(1), x, True)['params']
  assert params['shared_expert_gate']['kernel'].shape == (16, 1)
  params = {**params, 'shared_expert_gate': {'kernel': jnp.zeros((16, 1))}}
  half = gated.apply({'params': params}, x, True)
  ungated = MoeLayer(**fields, num_shared_experts=1).apply(
      {'params': {k: v for k, v in params.items() if k != 'shared_expert_gate'}}, x, True)
  routed = MoeLayer(**fields).apply(
      {'params': {k: params[k] for k in ('router', 'experts')}}, x, True)
  np.testing.assert_allclose(half, (routed + ungated) / 2, atol=1e-6)
  with pytest.raises(ValueError, match='shared_expert_gate'):
    MoeLayer(**fields, shared_expert_gate=True)


@pytest.mark.slow
def test_todays_routing_rules_and_expert_options_reach_the_model():
  """DeepSeek-V3's routing (sigmoid, 2 groups of 2 experts, one kept, routed scaling 2.5) and
  gpt-oss's experts (biases, clamped SwiGLU) set on a ModelConfig: each token's two experts share
  a group, its weights sum to 2.5, the experts have biases; a bad value names model.<field>."""
  config = _config(score_function='sigmoid', num_expert_groups=2, num_selected_groups=1,
                   group_score='top2_sum', normalize_weights=True, routed_scaling_factor=2.5,
                   num_selected_experts=2, eval_capacity_factor=None, expert_bias=True,
                   glu=True, activation='quick_gelu', activation_limit=7.0, glu_linear_offset=1.0)
  _, params, decisions, _ = _run(config)
  (decision,) = decisions.values()
  index = np.asarray(decision.expert_index)
  np.testing.assert_array_equal(index[..., 0] // 2, index[..., 1] // 2)
  np.testing.assert_allclose(decision.weight.sum(-1), 2.5, rtol=1e-6)
  experts = jax.tree_util.tree_leaves_with_path(params)
  assert {str(path[-1].key) for path, _ in experts if 'experts' in str(path)} >= {
      'bi', 'bi_gate', 'bo'}
  with pytest.raises(ConfigError, match=r"^model\.unselected_group_fill='-inf' is invalid"):
    _config(unselected_group_fill='-inf')
  with pytest.raises(ConfigError, match=r"^model\.glu_linear_offset=1\.0 is invalid"):
    _config(glu_linear_offset=1.0)


@pytest.mark.slow
@pytest.mark.parametrize('fields', [
    dict(score_function='sigmoid', num_expert_groups=2, num_selected_groups=1,
         group_score='top2_sum', normalize_weights=True, routed_scaling_factor=2.5),
    dict(softmax_after_top_k=True, router_bias=True, expert_bias=True, glu=True,
         activation='quick_gelu', activation_limit=7.0, glu_linear_offset=1.0)],
    ids=['deepseek_v3', 'gpt_oss'])
def test_decoding_with_todays_routing_rules_matches_the_window(fields):
  """Cached decoding routes (and drops, at capacity factor 0.5) as the whole window does."""
  assert_decoding_matches_the_window(_config(num_selected_experts=2, moe_every=1,
                                             eval_capacity_factor=0.5, group_size=12, **fields))
