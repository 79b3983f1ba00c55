"""Routing and expert variants: routers (cosine, distance, Gumbel, hash, top-p), DeepSeek-V3 bias
balancing, shared and fine-grained experts, Soft MoE. One contract test for all (on every dispatch
path), one defining property each. Decisions are read from what the layer sows."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import apply_layer, init_layer, smoke_config
from moejax import (ModelConfig, MoeLayer, SoftMoeLayer, balancing_bias_update, collect_decisions,
                    collect_router_probs, collect_routing_metrics, fine_grained, make_model,
                    per_token_flops, routers, routing, sharding, update_balancing_biases)
from moejax import layer as layer_lib
from moejax.train import loop
from moejax.train.evaluation import evaluate
from moejax.train.inputs import dummy_batch
from moejax.train.resume import load
from moejax.train.sampling import sample_text
from moejax.train.step import init_state, train_step

D, F, E = 8, 16, 4
B, L = 2, 16

VARIANTS = {
    'linear_top2': dict(num_selected_experts=2),
    'cosine': dict(router='cosine', num_selected_experts=2),
    'distance': dict(router='distance', num_selected_experts=2),
    'gumbel': dict(router='gumbel'),
    'hash': dict(router='hash'),
    'top_p': dict(top_p=0.6, num_selected_experts=3),
    'balancing_bias': dict(balancing_bias=True, num_selected_experts=2),
    'shared': dict(num_shared_experts=1),
    'fine_grained': fine_grained(E // 2, F, 1, 2),
    'deepseek_v3': dict(score_function='sigmoid', balancing_bias=True, num_expert_groups=2,
                        num_selected_groups=1, group_score='top2_sum', normalize_weights=True,
                        routed_scaling_factor=2.5, num_selected_experts=2),
    'gpt_oss': dict(softmax_after_top_k=True, router_bias=True, expert_bias=True, glu=True,
                    activation='quick_gelu', activation_limit=7.0, glu_linear_offset=1.0,
                    num_selected_experts=2),
}


def _inputs(batch=B, length=L, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, length, D))


def _token_ids(batch=B, length=L, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 1000)


def _layer(**overrides):
  return MoeLayer(**{'num_experts': E, 'ffn_dim': F, 'dispatch': 'indices',
                     **overrides})


def _apply_with_decision(layer, variables, x, **kwargs):
  """(output, intermediates, the layer's RoutingDecision) of one evaluation-mode call."""
  out, state = layer.apply(variables, x, True, mutable=['intermediates', 'decisions'], **kwargs)
  (decision,) = collect_decisions(state).values()
  return out, state, decision


@pytest.mark.parametrize('dispatch', ['indices', pytest.param('einsum', marks=pytest.mark.slow),
                                      pytest.param('sorted', marks=pytest.mark.slow)])
@pytest.mark.parametrize('name', list(VARIANTS))
def test_contract_shape_padding_capacity_gradients(name, dispatch):
  """Forced overflow (capacity factor 0.25) with padding: shape [B, L, D], padding never
  dispatched and zero, no expert buffer over C, gradients reach every learned router param."""
  layer = _layer(group_size=L, eval_capacity_factor=0.25, min_expert_capacity=1,
                 **{**VARIANTS[name], 'dispatch': dispatch})
  x = _inputs()
  mask = jnp.ones((B, L), bool).at[0, 2].set(False).at[1, -3:].set(False)
  kwargs = dict(padding_mask=mask, token_ids=_token_ids() if name == 'hash' else None)
  variables = init_layer(layer, x, **kwargs)
  out, state, decision = _apply_with_decision(layer, variables, x, **kwargs)
  assert out.shape == (B, L, D)
  np.testing.assert_array_equal(out[~mask], 0.0)
  assert not np.asarray(decision.chosen)[~np.asarray(mask)].any()
  assert not np.asarray(decision.dispatched)[~np.asarray(mask)].any()
  capacity = layer.capacity(L, deterministic=True)
  per_expert = jnp.einsum('gske,gsk->ge', jax.nn.one_hot(decision.expert_index, layer.num_experts),
                          decision.dispatched)  # [G, E]
  assert int(per_expert.max()) <= capacity
  slots = np.where(decision.dispatched, decision.position, -1)
  assert slots.max() < capacity
  assert collect_routing_metrics(state)['fraction_dropped'] > 0  # the overflow really happened

  def loss(params):
    y, _ = layer.apply({**variables, 'params': params}, x, True, mutable=['intermediates'],
                       **kwargs)
    return jnp.sum(y * jnp.cos(y))
  grads = jax.grad(loss)(variables['params'])
  if name == 'hash':
    assert set(variables['params']) == {'experts'}  # nothing learned routes
  else:
    router_grads = jax.tree.leaves(grads['router'])
    assert router_grads and all(np.abs(g).max() > 0 for g in router_grads)


def test_cosine_logits_bounded_by_inverse_temperature():
  router = routers.CosineRouterLogits(E, dim=4)
  tokens = 1000.0 * jax.random.normal(jax.random.key(0), (3, 64, D))
  variables = router.init(jax.random.key(1), tokens, True)
  for temperature in (0.07, 0.5, 2.0):
    params = dict(nn.unbox(variables)['params'], log_temperature=jnp.log(temperature))
    logits = router.apply({'params': params}, tokens, True)
    assert logits.dtype == jnp.float32
    assert np.abs(logits).max() <= 1 / temperature * (1 + 1e-5)
    assert np.abs(logits).max() > 0.3 / temperature  # not trivially small


def test_distance_router_is_a_gaussian_kernel_of_the_centroid_distance():
  router = routers.DistanceRouterLogits(E)
  tokens = jax.random.normal(jax.random.key(0), (2, 8, D))
  params = nn.unbox(router.init(jax.random.key(1), tokens, True))['params']
  logits = router.apply({'params': params}, tokens, True)
  sigma = np.exp(params['log_sigma'])
  distance = np.sum((np.asarray(tokens)[:, :, None, :] - np.asarray(params['centroids']))**2, -1)
  np.testing.assert_allclose(logits, -distance / (2 * sigma**2), rtol=1e-4, atol=1e-5)
  # A token on a centroid routes to that expert.
  on_centroid = jnp.broadcast_to(params['centroids'][2], (1, 1, D))
  assert int(jnp.argmax(router.apply({'params': params}, on_centroid, True))) == 2


def test_hash_routing_is_fixed_by_token_id_and_ignores_the_input():
  layer = _layer(router='hash', eval_capacity_factor=None)
  ids = _token_ids()
  x = _inputs()
  variables = init_layer(layer, x, token_ids=ids)
  out, _, first = _apply_with_decision(layer, variables, x, token_ids=ids)
  _, _, second = _apply_with_decision(layer, variables, 10 * _inputs(seed=5), token_ids=ids)
  expected = (np.asarray(ids, np.int64) * routers.HASH_PRIME) % 2**32 % E  # [B, L]
  np.testing.assert_array_equal(first.expert_index[..., 0], expected.reshape(B, L))
  np.testing.assert_array_equal(second.expert_index, first.expert_index)
  # Each token gets its hashed expert's FFN with weight 1 (dropless).
  p = variables['params']['experts']
  wi, wo = p['wi'][expected], p['wo'][expected]  # [B, L, D, F], [B, L, F, D]
  formula = jnp.einsum('blf,blfd->bld', jax.nn.relu(jnp.einsum('bld,bldf->blf', x, wi)), wo)
  np.testing.assert_allclose(out, formula, atol=1e-5, rtol=1e-5)
  # The same id goes to the same expert wherever it appears.
  same = jnp.full((B, L), 7)
  assert len(set(np.asarray(jnp.argmax(routers.hash_logits(same, E), -1)).ravel())) == 1
  with pytest.raises(ValueError, match='token_ids'):
    apply_layer(layer, variables, x)
  # No logits to bound (its -1e9 only make the softmax one-hot): router_max_logit is 0, not 1e9.
  _, state = apply_layer(layer, variables, x, token_ids=ids)
  assert float(collect_routing_metrics(state)['router_max_logit']) == 0.0


def test_gumbel_forward_is_hard_top1_with_weight_one():
  layer = _layer(router='gumbel', eval_capacity_factor=None)
  x = _inputs()
  variables = init_layer(layer, x)
  out, _ = apply_layer(layer, variables, x)
  p = variables['params']
  expert = np.asarray(jnp.argmax(x @ p['router']['dense']['kernel'], -1))  # [B, L]
  ffn = jnp.einsum('blf,blfd->bld', jax.nn.relu(jnp.einsum('bld,bldf->blf', x,
                                                           p['experts']['wi'][expert])),
                   p['experts']['wo'][expert])
  np.testing.assert_allclose(out, ffn, atol=1e-5, rtol=1e-5)  # weight exactly 1, no softmax
  # Training draws Gumbel noise from the 'gating' stream.
  with pytest.raises(Exception, match='gating'):
    layer.apply(variables, x, False)
  noisy, _ = layer.apply(variables, x, False, rngs={'gating': jax.random.key(3)},
                         mutable=['intermediates'])
  assert np.abs(noisy - out).max() > 1e-3


def test_top_p_takes_the_fewest_experts_reaching_p():
  probs = jnp.array([[[0.5, 0.3, 0.1, 0.05, 0.05],   # 0.5 + 0.3 >= 0.75: 2 experts
                      [0.9, 0.05, 0.03, 0.01, 0.01],  # 0.9 alone: 1
                      [0.1, 0.4, 0.2, 0.3, 0.0],      # 0.4 + 0.3 < 0.75, + 0.2: 3
                      [0.2, 0.2, 0.2, 0.2, 0.2]]])    # would need 4: capped at K = 3
  decision = routing.top_k_routing(probs, jnp.ones((1, 4), bool), num_selected_experts=3,
                                   capacity=4, causal=True, normalize_weights=True, top_p=0.75)
  np.testing.assert_array_equal(decision.chosen.sum(-1)[0], [2, 1, 3, 3])
  np.testing.assert_array_equal(decision.expert_index[0, 2], [1, 3, 2])
  np.testing.assert_allclose(decision.weight[0, 0], [0.5 / 0.8, 0.3 / 0.8, 0.0], rtol=1e-6)
  np.testing.assert_allclose(decision.weight[0, 1], [1.0, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(decision.dispatched, decision.chosen)
  # An unused choice takes no slot: expert 1 (second choice of token 0) is first choice of t2.
  assert int(decision.position[0, 2, 0]) == 1


def _skewed_probs():
  logits = jax.random.normal(jax.random.key(0), (4, 256, E)) + jnp.array([2.0, 1.0, 0.0, -0.5])
  return jax.nn.softmax(logits)


def test_bias_update_drives_usage_toward_uniform():
  probs, valid = _skewed_probs(), jnp.ones((4, 256), bool)

  def usage(bias):
    decision = routing.top_k_routing(probs, valid, num_selected_experts=1, capacity=256,
                                     causal=True, selection_scores=probs + bias)
    return routing.expert_usage(decision).mean(0)  # [E]

  bias = jnp.zeros(E)
  start = usage(bias)
  for _ in range(50):
    bias = balancing_bias_update(bias, usage(bias), rate=0.01)
  end = usage(bias)
  ratio = lambda u: float(u.max() / u.min())  # noqa: E731
  assert ratio(start) > 5
  assert ratio(end) < 1.5 and ratio(end) < ratio(start) / 4


def test_balancing_bias_selects_but_does_not_weight():
  """A bias favouring expert 3 sends every token there; the combine weight is still the unbiased
  probability of expert 3."""
  layer = _layer(balancing_bias=True, eval_capacity_factor=None)
  x = _inputs()
  variables = init_layer(layer, x)
  assert set(variables['balancing_bias_state']) == {'bias', 'load'}
  biased = {**variables, 'balancing_bias_state': {'bias': jnp.array([0.0, 0.0, 0.0, 5.0]),
                                               'load': jnp.zeros(E)}}
  out, state = layer.apply(biased, x, True, mutable=['intermediates', 'balancing_bias_state'])
  np.testing.assert_allclose(state['balancing_bias_state']['load'], [0, 0, 0, 1])
  p = variables['params']
  prob3 = jax.nn.softmax(x @ p['router']['dense']['kernel'])[..., 3:]
  ffn3 = jax.nn.relu(x @ p['experts']['wi'][3]) @ p['experts']['wo'][3]
  np.testing.assert_allclose(out, prob3 * ffn3, atol=1e-5, rtol=1e-5)
  updated = update_balancing_biases(state['balancing_bias_state'], rate=0.1)
  np.testing.assert_allclose(updated['bias'], [0.1, 0.1, 0.1, 4.9], rtol=1e-6)


@pytest.mark.parametrize('fill', ['zero', 'neg_inf'])
def test_sigmoid_group_limited_routing_with_scaling_by_hand(fill):
  """DeepSeek-V3's routing in the layer, read from the sown decision: sigmoid scores s, a
  correction bias of -1 (every corrected score negative), 2 groups of 2 experts, one kept by its
  top-2 sum, top-2, weights 2.5 * s / (s_a + s_b). With 'zero' (transformers 4.57.6) the masked
  group's experts (0 > s - 1) are the ones chosen; with 'neg_inf' (DeepSeek's code) the kept
  group's."""
  layer = _layer(score_function='sigmoid', balancing_bias=True, num_expert_groups=2,
                 num_selected_groups=1, group_score='top2_sum', unselected_group_fill=fill,
                 normalize_weights=True, routed_scaling_factor=2.5, num_selected_experts=2,
                 eval_capacity_factor=None)
  x = jnp.eye(D)[None, :2]  # two tokens, e_0 and e_1: their logits are the kernel's rows
  logits = np.array([[2.0, 1.0, 0.0, -1.0], [-1.0, 0.0, 1.0, 2.0]], np.float32)  # keep g0, g1
  variables = init_layer(layer, x)
  kernel = jnp.zeros((D, E)).at[:2].set(logits)
  variables = {'params': {**variables['params'], 'router': {'dense': {'kernel': kernel}}},
               'balancing_bias_state': {'bias': -jnp.ones(E), 'load': jnp.zeros(E)}}
  _, state, decision = _apply_with_decision(layer, variables, x)
  kept = [[0, 1], [2, 3]]  # each token's kept group
  expected = kept if fill == 'neg_inf' else kept[::-1]
  np.testing.assert_array_equal(np.sort(decision.expert_index[0], axis=-1), expected)
  s = 1 / (1 + np.exp(-logits))
  chosen = np.take_along_axis(s, np.asarray(decision.expert_index[0]), axis=-1)
  np.testing.assert_allclose(decision.weight[0], 2.5 * chosen / chosen.sum(-1, keepdims=True),
                             rtol=1e-6)
  (probs,) = collect_router_probs(state).values()  # what the aux losses read: s / sum s
  np.testing.assert_allclose(probs[0], s / s.sum(-1, keepdims=True), rtol=1e-6)


def test_softmax_after_top_k_layer_equals_normalized_softmax_layer():
  """gpt-oss's softmax over the chosen logits is softmax probabilities renormalized: the same
  layer output (router with a bias)."""
  x = _inputs()
  after = _layer(softmax_after_top_k=True, router_bias=True, num_selected_experts=2)
  before = _layer(normalize_weights=True, router_bias=True, num_selected_experts=2)
  variables = init_layer(after, x)
  variables = {'params': {**variables['params'], 'router': {'dense': {
      'kernel': variables['params']['router']['dense']['kernel'],
      'bias': jnp.array([0.5, -0.5, 1.0, 0.0])}}}}
  np.testing.assert_allclose(after.apply(variables, x, True), before.apply(variables, x, True),
                             atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
def test_train_step_updates_the_balancing_bias(scan_layers):
  config = ModelConfig(vocab_size=32, num_layers=2, model_dim=D, num_heads=2, ffn_dim=F,
                       num_experts=E, balancing_bias_rate=0.01, scan_layers=scan_layers)
  model, tx = make_model(config), optax.adam(1e-3)
  batch = dummy_batch(config, 2, 8)
  batch['targets'] = jax.random.randint(jax.random.key(1), (2, 8), 1, 32)
  state = init_state(model, tx, batch, 0)
  biases = jax.tree.leaves(state.balancing_bias_state)
  assert biases and all(np.all(b == 0) for b in biases)
  new_state, _ = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, alpha=0.0,
                                                 beta=0.0))(state, batch)
  leaves = jax.tree_util.tree_leaves_with_path(new_state.balancing_bias_state)
  (layer_state,) = [v for k, v in leaves if 'bias' in jax.tree_util.keystr(k)]
  (load,) = [v for k, v in leaves if 'load' in jax.tree_util.keystr(k)]
  np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)  # this batch's usage was recorded
  np.testing.assert_allclose(layer_state, 0.01 * np.sign(load.mean(-1, keepdims=True) - load),
                             atol=1e-7)


def test_shared_experts_see_every_token():
  """All tokens forced to routed expert 0 with capacity 2: dropped tokens still get the shared
  FFN, kept ones the shared FFN plus their routed output; padding gets zeros."""
  layer = _layer(num_shared_experts=2, router_bias=True, group_size=L, eval_capacity_factor=0.5,
                 min_expert_capacity=1)
  x = _inputs()
  mask = jnp.ones((B, L), bool).at[1, -2:].set(False)
  variables = init_layer(layer, x)
  params = variables['params']
  params['router']['dense'] = {'kernel': jnp.zeros((D, E)),
                               'bias': 10.0 * jax.nn.one_hot(0, E)}
  out, _ = apply_layer(layer, {'params': params}, x, padding_mask=mask)
  s = params['shared_experts']
  shared = sum(jax.nn.relu(x @ s['wi'][i]) @ s['wo'][i] for i in range(2))
  capacity = layer.capacity(L, deterministic=True)
  assert capacity == 2
  np.testing.assert_allclose(out[:, capacity:][mask[:, capacity:]],
                             shared[:, capacity:][mask[:, capacity:]], atol=1e-5, rtol=1e-5)
  weight = jax.nn.softmax(params['router']['dense']['bias'])[0]
  routed = weight * (jax.nn.relu(x @ params['experts']['wi'][0]) @ params['experts']['wo'][0])
  np.testing.assert_allclose(out[:, :capacity], (shared + routed)[:, :capacity], atol=1e-5,
                             rtol=1e-5)
  np.testing.assert_array_equal(out[~mask], 0.0)


@pytest.mark.slow
def test_fine_grained_has_the_flops_and_params_of_its_coarse_twin():
  num_experts, hidden, k, m = 8, 64, 2, 4
  fields = fine_grained(num_experts, hidden, k, m)
  assert fields == dict(num_experts=32, ffn_dim=16, num_selected_experts=8)
  per_token = lambda f: f['num_selected_experts'] * 2 * D * f['ffn_dim'] * 2  # noqa
  assert per_token(fields) == per_token(dict(num_selected_experts=k, ffn_dim=hidden))
  # The model FLOP count differs only by the router's 2 * D * (E m - E) per (sparse) layer.
  coarse = ModelConfig(vocab_size=32, num_layers=2, model_dim=D, num_heads=2, ffn_dim=hidden,
                       num_experts=num_experts, num_selected_experts=k, moe_every=1)
  fine = ModelConfig(vocab_size=32, num_layers=2, model_dim=D, num_heads=2, moe_every=1,
                     ffn_dim=fields['ffn_dim'], num_experts=fields['num_experts'],
                     num_selected_experts=fields['num_selected_experts'])
  assert per_token_flops(fine, 16) - per_token_flops(coarse, 16) == 2 * 2 * D * (32 - 8)
  x = _inputs(batch=1, length=8)
  count = lambda layer: sum(  # noqa: E731
      a.size for a in jax.tree.leaves(init_layer(layer, x)['params']['experts']))
  assert count(MoeLayer(**fields)) == count(MoeLayer(num_experts=8, ffn_dim=64))
  with pytest.raises(ValueError, match='fine_grained m=3'):
    fine_grained(num_experts, hidden, k, 3)


def test_soft_moe_shape_padding_formula_and_causal_error():
  with pytest.raises(ValueError, match='SoftMoeLayer.causal=True'):
    SoftMoeLayer(num_experts=E, ffn_dim=F, causal=True)
  assert SoftMoeLayer(num_experts=E, ffn_dim=F).causal is False  # the default is valid
  layer = SoftMoeLayer(num_experts=E, ffn_dim=F, slots_per_expert=2)
  x = _inputs()
  mask = jnp.ones((B, L), bool).at[0, -4:].set(False)
  variables = nn.unbox(layer.init(jax.random.key(0), x, True))
  out = layer.apply(variables, x, True, padding_mask=mask)
  assert out.shape == (B, L, D)
  np.testing.assert_array_equal(out[~mask], 0.0)
  garbage = jnp.where(mask[..., None], x, 100.0)
  np.testing.assert_allclose(layer.apply(variables, garbage, True, padding_mask=mask), out,
                             atol=1e-5)
  # One expert, one slot: every token gets FFN(softmax-over-tokens mixture of its group).
  single = SoftMoeLayer(num_experts=1, ffn_dim=F, causal=False)
  v = nn.unbox(single.init(jax.random.key(0), x, True))['params']
  logits = (x / jnp.linalg.norm(x, axis=-1, keepdims=True)) @ (
      v['phi'] / jnp.linalg.norm(v['phi'], axis=0))  # [B, L, 1]
  slot = jnp.einsum('bl,bld->bd', jax.nn.softmax(logits[..., 0], axis=1), x)  # [B, D]
  expected = jax.nn.relu(slot @ v['experts']['wi'][0]) @ v['experts']['wo'][0]
  np.testing.assert_allclose(single.apply({'params': v}, x, True),
                             jnp.broadcast_to(expected[:, None], x.shape), atol=1e-5, rtol=1e-5)


def test_shared_experts_draw_a_dropout_key_of_their_own(monkeypatch):
  """Under an expert-parallel mesh each device's routed experts fold the device index into the
  dropout key; the shared experts' key must be none of those (device 1's was fold_in(key, 1))."""
  keys = []
  real = layer_lib.expert_ffn

  def spy(tokens, weights, *, dropout_rng=None, **kwargs):
    if dropout_rng is not None:
      jax.debug.callback(lambda k: keys.append(tuple(np.asarray(k).ravel())),
                         jax.random.key_data(dropout_rng))
    return real(tokens, weights, dropout_rng=dropout_rng, **kwargs)
  monkeypatch.setattr(layer_lib, 'expert_ffn', spy)
  layer = _layer(num_shared_experts=1, expert_dropout=0.5, dispatch='indices')
  x = _inputs(batch=8, length=8)
  variables = layer.init(jax.random.key(0), x, True)
  mesh = sharding.make_mesh(data=2, expert=4)
  with jax.set_mesh(mesh):
    jax.jit(lambda v, x: layer.apply(v, x, False, rngs={'dropout': jax.random.key(3)}))(
        sharding.shard_params(variables, mesh), sharding.shard_batch(x, mesh))
  jax.effects_barrier()
  assert len(keys) == 8 + 1 and len(set(keys)) == 9  # 8 devices' routed experts, the shared


def test_variants_under_an_expert_parallel_mesh_equal_one_device():
  x = _inputs(batch=8, length=8)
  mesh = sharding.make_mesh(data=2, expert=4)
  for overrides in (dict(router='cosine', top_p=0.5, num_selected_experts=2),
                    dict(balancing_bias=True, num_shared_experts=1, num_selected_experts=2)):
    layer = _layer(**overrides)
    variables = layer.init(jax.random.key(0), x, True)
    if 'balancing_bias_state' in variables:
      variables = {**variables, 'balancing_bias_state': {'bias': jnp.arange(E) / 10.0,
                                                      'load': jnp.zeros(E)}}
    apply = jax.jit(lambda v, x: layer.apply(v, x, True))
    expected = apply(nn.unbox(variables), x)
    sharded_vars = sharding.shard_params(variables, mesh)
    with jax.set_mesh(mesh):
      out = apply(sharded_vars, sharding.shard_batch(x, mesh))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


CONFIG_ERRORS = [
    (dict(router='magic'), 'router'),
    (dict(router='hash', num_selected_experts=2), 'router'),
    (dict(router='gumbel', routing='dense'), 'router'),
    (dict(router='cosine', router_bias=True), 'router_bias'),
    (dict(router='hash', jitter_noise=0.1), 'jitter_noise'),
    (dict(router_dim=0), 'router_dim'),
    (dict(gumbel_temperature=0.0), 'gumbel_temperature'),
    (dict(top_p=1.5, num_selected_experts=2), 'top_p'),
    (dict(top_p=0.5), 'top_p'),
    (dict(top_p=0.5, num_selected_experts=2, random_routing=True), 'top_p'),
    (dict(balancing_bias=True, router='hash'), 'balancing_bias'),
    (dict(balancing_bias=True, routing='dense'), 'balancing_bias'),
    (dict(num_shared_experts=-1), 'num_shared_experts'),
    (dict(score_function='tanh'), 'score_function'),
    (dict(score_function='sigmoid', router='hash'), 'score_function'),
    (dict(top_p=0.5, num_selected_experts=2, score_function='sigmoid'), 'top_p'),
    (dict(softmax_after_top_k=True, routing='dense'), 'softmax_after_top_k'),
    (dict(softmax_after_top_k=True, score_function='sigmoid'), 'softmax_after_top_k'),
    (dict(num_expert_groups=3), 'num_expert_groups'),
    (dict(num_expert_groups=2, num_selected_groups=3), 'num_selected_groups'),
    (dict(num_expert_groups=4, num_selected_groups=1, num_selected_experts=2),
     'num_selected_groups'),
    (dict(num_expert_groups=4, num_selected_groups=2, group_score='top2_sum'), 'group_score'),
    (dict(group_score='mean'), 'group_score'),
    (dict(unselected_group_fill='-inf'), 'unselected_group_fill'),
    (dict(routed_scaling_factor=0.0), 'routed_scaling_factor'),
    (dict(activation_limit=-1.0), 'activation_limit'),
    (dict(glu_linear_offset=1.0), 'glu_linear_offset'),
]


@pytest.mark.parametrize('overrides,field', CONFIG_ERRORS)
def test_bad_variant_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=f'MoeLayer.{field}='):
    _layer(**overrides)


def test_loop_trains_evaluates_and_samples_a_bias_balanced_model(tmp_path, tfds_dir):
  """The bias state travels through training, checkpoints, evaluation and sampling."""
  config = smoke_config(tfds_dir, num_steps=4)
  config.model.balancing_bias_rate = 0.05
  summary = loop.train(config, str(tmp_path / 'run'), quiet=True)
  state = summary['state']
  biases = [np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_leaves_with_path(state.balancing_bias_state)
            if 'bias' in jax.tree_util.keystr(path)]
  assert biases and any(np.abs(bias).max() > 0 for bias in biases)  # the updates ran
  assert np.isfinite(summary['eval']['nll'])
  run, restored = load(config, str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, restored.balancing_bias_state,
               state.balancing_bias_state)
  evaluated = evaluate(run, restored.params, bias_state=restored.balancing_bias_state)
  np.testing.assert_allclose(evaluated['nll'], summary['eval']['nll'], rtol=1e-6)
  text = sample_text(run, restored.params, 'The', 5, 0.0, 0, restored.balancing_bias_state)
  assert isinstance(text, str)
