"""MoeLayer end to end: overflow, equivalences, padding, dtypes, transforms, metrics."""
import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROUTING_OPTIONS, apply_layer, init_layer, perturbed
from moejax import MoeLayer, collect_aux_losses, collect_routing_metrics
from moejax.dispatch import auto_dispatch, block_tile, default_block_size

D, F = 8, 16
DISPATCHES = ['einsum', 'indices', 'sorted', 'grouped']


def _inputs(batch=2, length=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, length, D))


def _force_expert(variables, expert, num_experts):
  """Router that sends every token to `expert`: zero kernel, bias favouring it."""
  params = jax.tree.map(lambda a: a, variables['params'])
  router = params['router']['dense']
  router['kernel'] = jnp.zeros_like(router['kernel'])
  router['bias'] = 10.0 * jax.nn.one_hot(expert, num_experts)
  return {'params': params}


@pytest.mark.parametrize('dispatch', DISPATCHES)
def test_adversarial_overflow_keeps_exactly_capacity_tokens(dispatch):
  layer = MoeLayer(num_experts=4, ffn_dim=F, router_bias=True, dispatch=dispatch,
                   group_size=16, eval_capacity_factor=1.0, min_expert_capacity=1)
  x = _inputs(batch=2, length=16)
  variables = _force_expert(init_layer(layer, x), 0, 4)
  out, state = apply_layer(layer, variables, x)
  capacity = layer.capacity(16, deterministic=True)
  assert capacity == 4
  nonzero = np.abs(np.asarray(out)).sum(-1) > 0  # [B, L]
  # Each group (here: each sequence) keeps exactly its first C tokens, in sequence order.
  expected = np.zeros((2, 16), bool)
  expected[:, :capacity] = True
  np.testing.assert_array_equal(nonzero, expected)
  metrics = collect_routing_metrics(state)
  np.testing.assert_allclose(metrics['fraction_dropped'], 1 - capacity / 16, rtol=1e-6)
  np.testing.assert_allclose(metrics['expert_usage'], [1, 0, 0, 0], atol=1e-7)


def _losses_outputs_grads(layers, variables, x, padding_mask=None):
  """[(loss, output, (param grads, input grads))] of each layer on the same variables, compiled
  as one program: one compile rather than one per layer."""
  def loss_fn(layer, params, x):
    out, state = layer.apply({**variables, 'params': params}, x, True,
                             padding_mask=padding_mask, mutable=['intermediates'])
    aux = collect_aux_losses(state)
    return jnp.sum(out * jnp.cos(out)) + aux['load_balancing_loss'] + aux['router_z_loss'], out

  def each(params, x):
    return [jax.value_and_grad(functools.partial(loss_fn, layer), argnums=(0, 1),
                               has_aux=True)(params, x) for layer in layers]
  return [(loss, out, grads) for (loss, out), grads in jax.jit(each)(variables['params'], x)]


EQUIVALENCE_CASES = [(1, 1), (1, 4), (2, 4), (1, 16), (2, 16)]
CAPACITIES = {'overflow': 0.5, 'roomy': 4.0, 'dropless': None}
FAST_EQUIVALENCE = {(2, 4, 'overflow')}  # the rest: `make test` only


@pytest.mark.parametrize('k,num_experts,capacity_factor', [
    pytest.param(k, e, factor, id=f'{name}-{k}-{e}',
                 marks=() if (k, e, name) in FAST_EQUIVALENCE else pytest.mark.slow)
    for name, factor in CAPACITIES.items() for k, e in EQUIVALENCE_CASES])
def test_dispatch_methods_agree(k, num_experts, capacity_factor):
  """einsum, indices, sorted (blocks of 4 and of the default size) and grouped dispatch: same
  outputs and gradients; None is dropless."""
  x = _inputs(batch=2, length=32, seed=k * num_experts)
  padding_mask = jnp.ones((2, 32), bool).at[1, -5:].set(False)
  layer = MoeLayer(num_experts=num_experts, ffn_dim=F, num_selected_experts=k,
                   eval_capacity_factor=capacity_factor, min_expert_capacity=1,
                   router_init_scale=10.0)
  variables = init_layer(layer, x)  # the paths share the params: they differ only in dispatch
  paths = (('einsum', None), ('indices', None), ('sorted', 4), ('sorted', None), ('grouped', None))
  results = _losses_outputs_grads([layer.clone(dispatch=dispatch, block_size=block_size)
                                   for dispatch, block_size in paths], variables, x, padding_mask)
  # 1e-6; 1e-5 for grouped: XLA:CPU's ragged_dot sums in another order.
  tols = [1e-5 if dispatch == 'grouped' else 1e-6 for dispatch, _ in paths[1:]]
  _, out_a, grads_a = results[0]
  for tol, (_, out_b, grads_b) in zip(tols, results[1:]):
    np.testing.assert_allclose(out_a, out_b, atol=tol, rtol=tol)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=tol, rtol=tol),
                 grads_a, grads_b)
  if capacity_factor is not None and capacity_factor < 1 and num_experts > 1:  # really overflows
    layer = MoeLayer(num_experts=num_experts, ffn_dim=F, num_selected_experts=k,
                     eval_capacity_factor=capacity_factor, min_expert_capacity=1)
    _, state = apply_layer(layer, variables, x, padding_mask=padding_mask)
    assert collect_routing_metrics(state)['fraction_dropped'] > 0.3


@pytest.mark.parametrize('options', [
    pytest.param(name, marks=() if name == 'sigmoid_groups_biased_experts' else pytest.mark.slow)
    for name in ROUTING_OPTIONS])
def test_routing_options_dispatch_methods_agree(options):
  """The new routing and expert options, with overflow and padding: einsum, indices, sorted and
  grouped dispatch give the same outputs and gradients (params and input) to 1e-5."""
  x = _inputs(batch=2, length=16, seed=3)
  padding_mask = jnp.ones((2, 16), bool).at[1, -3:].set(False)
  layer = MoeLayer(num_experts=8, ffn_dim=F, num_selected_experts=2, eval_capacity_factor=0.5,
                   min_expert_capacity=1, **ROUTING_OPTIONS[options])
  variables = perturbed(init_layer(layer, x))  # shared: the paths differ only in dispatch
  paths = (('einsum', None), ('indices', None), ('sorted', 4), ('grouped', None))
  results = _losses_outputs_grads([layer.clone(dispatch=dispatch, block_size=block_size)
                                   for dispatch, block_size in paths], variables, x, padding_mask)
  assert results[0][2][0]['experts']['bo'].std() > 0  # the biases count
  for result in results[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 results[0], result)


@pytest.mark.parametrize('dispatch', DISPATCHES)
def test_dropless_never_drops_even_when_every_token_picks_one_expert(dispatch):
  layer = MoeLayer(num_experts=4, ffn_dim=F, router_bias=True, dispatch=dispatch,
                   group_size=16, eval_capacity_factor=None, train_capacity_factor=None)
  assert layer.capacity(16, deterministic=True) == layer.capacity(16, deterministic=False) == 16
  x = _inputs(batch=2, length=16)
  variables = _force_expert(init_layer(layer, x), 0, 4)
  out, state = apply_layer(layer, variables, x)
  wi, wo = (variables['params']['experts'][name][0] for name in ('wi', 'wo'))
  weight = jax.nn.softmax(variables['params']['router']['dense']['bias'])[0]  # every token's top-1 prob
  np.testing.assert_allclose(out, weight * (jax.nn.relu(x @ wi) @ wo), atol=1e-6, rtol=1e-5)
  assert collect_routing_metrics(state)['fraction_dropped'] == 0


def test_one_expert_equals_dense_ffn():
  layer = MoeLayer(num_experts=1, ffn_dim=F, group_size=8)
  x = _inputs()
  variables = init_layer(layer, x)
  out, _ = apply_layer(layer, variables, x)
  wi = variables['params']['experts']['wi'][0]
  wo = variables['params']['experts']['wo'][0]
  np.testing.assert_allclose(out, jax.nn.relu(x @ wi) @ wo, atol=1e-6, rtol=1e-6)


def test_glu_gelu_expert_equals_formula():
  layer = MoeLayer(num_experts=1, ffn_dim=F, glu=True, activation='gelu')
  x = _inputs()
  variables = init_layer(layer, x)
  out, _ = apply_layer(layer, variables, x)
  p = variables['params']['experts']
  expected = (nn.gelu(x @ p['wi'][0]) * (x @ p['wi_gate'][0])) @ p['wo'][0]
  np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-6)


def test_clamped_swiglu_expert_with_biases_equals_formula():
  """gpt-oss's expert: (clip(up, -limit, limit) + 1) * g * sigmoid(1.702 g), g = min(gate,
  limit), gate = x wi + bi, up = x wi_gate + bi_gate; then wo and bo. limit 0.3 clamps here."""
  layer = MoeLayer(num_experts=1, ffn_dim=F, glu=True, activation='quick_gelu',
                   activation_limit=0.3, glu_linear_offset=1.0, expert_bias=True)
  x = _inputs()
  variables = perturbed(init_layer(layer, x), scale=0.5)
  out, _ = apply_layer(layer, variables, x)
  p = {name: np.asarray(w[0], np.float64) for name, w in variables['params']['experts'].items()}
  x = np.asarray(x, np.float64)
  gate = np.minimum(x @ p['wi'] + p['bi'], 0.3)
  up = np.clip(x @ p['wi_gate'] + p['bi_gate'], -0.3, 0.3)
  assert (x @ p['wi'] + p['bi'] > 0.3).any() and (np.abs(x @ p['wi_gate'] + p['bi_gate']) > 0.3).any()
  hidden = (up + 1) * gate / (1 + np.exp(-1.702 * gate))
  np.testing.assert_allclose(out, hidden @ p['wo'] + p['bo'], atol=1e-5, rtol=1e-5)


def test_dense_routing_mixes_all_experts():
  layer = MoeLayer(num_experts=3, ffn_dim=F, routing='dense')
  x = _inputs(batch=1, length=8)
  variables = init_layer(layer, x)
  out, state = apply_layer(layer, variables, x)
  p = variables['params']
  probs = jax.nn.softmax(x @ p['router']['dense']['kernel'])  # [B, L, E]
  hidden = jax.nn.relu(jnp.einsum('bld,edf->blef', x, p['experts']['wi']))
  per_expert = jnp.einsum('blef,efd->bled', hidden, p['experts']['wo'])
  np.testing.assert_allclose(out, jnp.einsum('ble,bled->bld', probs, per_expert), atol=1e-5)
  assert collect_routing_metrics(state)['fraction_dropped'] == 0


def test_uniform_router_gives_unit_load_balancing_loss_and_formula_z_loss():
  for k in (1, 2):
    layer = MoeLayer(num_experts=4, ffn_dim=F, num_selected_experts=k)
    x = _inputs()
    variables = init_layer(layer, x)
    uniform = jax.tree.map(jnp.zeros_like, variables)  # zero router kernel: probabilities 1/E
    uniform['params']['experts'] = variables['params']['experts']
    _, state = apply_layer(layer, uniform, x)
    np.testing.assert_allclose(collect_aux_losses(state)['load_balancing_loss'], 1.0, rtol=1e-6)
    _, state = apply_layer(layer, variables, x)
    logits = x @ variables['params']['router']['dense']['kernel']
    z = jax.nn.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(collect_aux_losses(state)['router_z_loss'], jnp.mean(z**2),
                               rtol=1e-5)


def test_gradients_reach_the_router():
  layer = MoeLayer(num_experts=4, ffn_dim=F)
  x = _inputs()
  variables = init_layer(layer, x)
  grads = jax.grad(lambda p: jnp.sum(layer.apply({'params': p}, x, True)**2))(variables['params'])
  assert np.abs(grads['router']['dense']['kernel']).min() > 0


def test_bfloat16_layer_keeps_router_in_float32():
  layer = MoeLayer(num_experts=4, ffn_dim=F, dtype=jnp.bfloat16, num_selected_experts=2)
  x = _inputs().astype(jnp.bfloat16)
  variables = init_layer(layer, x)
  out, state = layer.apply(variables, x, True, capture_intermediates=True,
                           mutable=['intermediates'])
  assert out.dtype == jnp.bfloat16
  sown = state['intermediates']
  assert sown['router']['__call__'][0].dtype == jnp.float32  # the router logits
  for name in ('load_balancing_loss', 'router_z_loss', 'router_confidence', 'expert_usage'):
    assert sown[name][0].dtype == jnp.float32, name
  assert variables['params']['router']['dense']['kernel'].dtype == jnp.float32
  # The float32 router decides as the float32 layer does on the same (bf16-rounded) inputs.
  f32_layer = layer.clone(dtype=jnp.float32)
  _, f32_state = apply_layer(f32_layer, variables, x.astype(jnp.float32))
  np.testing.assert_allclose(collect_routing_metrics(state)['expert_usage'],
                             collect_routing_metrics(f32_state)['expert_usage'])


@pytest.mark.parametrize('routing', ['tokens_choose', 'experts_choose', 'dense'])
@pytest.mark.parametrize('dispatch', DISPATCHES)
def test_padding_gets_zero_and_does_not_change_other_tokens(routing, dispatch):
  layer = MoeLayer(num_experts=4, ffn_dim=F, routing=routing, dispatch=dispatch,
                   num_selected_experts=2, causal=False, eval_capacity_factor=1.0)
  x = _inputs()
  mask = jnp.ones((2, 16), bool).at[0, 3].set(False).at[1, -4:].set(False)
  variables = init_layer(layer, x)
  out, state = apply_layer(layer, variables, x, padding_mask=mask)
  np.testing.assert_array_equal(out[~mask], 0.0)
  # Whatever the padded positions hold, real tokens and every statistic are unchanged.
  garbage = jnp.where(mask[..., None], x, 100.0 * _inputs(seed=7))
  out2, state2 = apply_layer(layer, variables, garbage, padding_mask=mask)
  np.testing.assert_allclose(out2, out, atol=1e-6)
  for name, value in {**collect_routing_metrics(state), **collect_aux_losses(state)}.items():
    np.testing.assert_allclose(value, {**collect_routing_metrics(state2),
                                       **collect_aux_losses(state2)}[name], rtol=1e-6)


@pytest.mark.parametrize('dispatch', [  # make test-fast keeps indices and grouped
    pytest.param(d, marks=() if d in ('indices', 'grouped') else pytest.mark.slow)
    for d in DISPATCHES])
def test_causal_routing_never_looks_at_later_tokens(dispatch):
  """Under heavy overflow with top-2, changing token t+1.. leaves outputs 0..t unchanged."""
  layer = MoeLayer(num_experts=4, ffn_dim=F, num_selected_experts=2, dispatch=dispatch,
                   eval_capacity_factor=0.5, min_expert_capacity=1, router_init_scale=10.0)
  x = _inputs(batch=1, length=32)
  variables = init_layer(layer, x)
  out, _ = apply_layer(layer, variables, x)
  for t in (3, 10, 20):
    changed = x.at[:, t + 1:].set(_inputs(batch=1, length=32, seed=t)[:, t + 1:])
    out_changed, _ = apply_layer(layer, variables, changed)
    np.testing.assert_allclose(out_changed[:, :t + 1], out[:, :t + 1], atol=1e-6)
  # The choice-major (GShard) order does let later first choices evict earlier second choices.
  encoder = layer.clone(causal=False)
  leaks = 0
  for seed in range(5):
    x = _inputs(batch=1, length=32, seed=100 + seed)
    out, _ = apply_layer(encoder, variables, x)
    changed = x.at[:, 16:].set(_inputs(batch=1, length=32, seed=200 + seed)[:, 16:])
    out_changed, _ = apply_layer(encoder, variables, changed)
    leaks += int(np.abs(out_changed[:, :16] - out[:, :16]).max() > 1e-6)
  assert leaks > 0


def test_training_mode_uses_train_capacity_and_rng_streams():
  layer = MoeLayer(num_experts=4, ffn_dim=F, num_selected_experts=2,
                   train_capacity_factor=0.5, eval_capacity_factor=2.0, min_expert_capacity=1,
                   jitter_noise=0.1, expert_dropout=0.5, random_routing=True)
  assert layer.capacity(16, deterministic=False) == 4
  assert layer.capacity(16, deterministic=True) == 16
  x = _inputs()
  variables = init_layer(layer, x)
  rngs = {'dropout': jax.random.key(1), 'jitter': jax.random.key(2), 'gating': jax.random.key(3)}
  out_train, _ = layer.apply(variables, x, False, rngs=rngs, mutable=['intermediates'])
  out_train2, _ = layer.apply(variables, x, False, rngs=rngs, mutable=['intermediates'])
  np.testing.assert_array_equal(out_train, out_train2)  # same keys, same numbers
  other = {**rngs, 'dropout': jax.random.key(9)}
  out_other, _ = layer.apply(variables, x, False, rngs=other, mutable=['intermediates'])
  assert np.abs(out_other - out_train).max() > 1e-3
  for missing in rngs:
    with pytest.raises(Exception, match=missing):
      layer.apply(variables, x, False, rngs={k: v for k, v in rngs.items() if k != missing})
  # Evaluation needs no rng and is unaffected by noise settings.
  out_eval, _ = apply_layer(layer, variables, x)
  plain = layer.clone(jitter_noise=0.0, expert_dropout=0.0, random_routing=False)
  np.testing.assert_array_equal(out_eval, apply_layer(plain, variables, x)[0])


def test_experts_are_initialized_independently():
  layer = MoeLayer(num_experts=8, ffn_dim=256, init_scale=0.1)
  x = jnp.zeros((1, 4, 128))
  wi = nn.unbox(layer.init(jax.random.key(0), x, True))['params']['experts']['wi']  # [E, D, F]
  assert wi.shape == (8, 128, 256)
  flat = np.asarray(wi).reshape(8, -1)
  correlation = np.corrcoef(flat)
  assert np.abs(correlation[~np.eye(8, dtype=bool)]).max() < 0.02
  np.testing.assert_allclose(flat.std(axis=1), np.sqrt(0.1 / 128), rtol=0.05)


class _Stack(nn.Module):
  """Two MoE layers with residuals, plainly or under nn.scan (and optionally nn.remat)."""
  scan: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block_cls = nn.remat(_Block, static_argnums=(2,)) if self.remat else _Block
    if self.scan:
      scanned = nn.scan(block_cls, variable_axes={'params': 0, 'intermediates': 0},
                        split_rngs={'params': True}, length=2, in_axes=nn.broadcast,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scanned(name='blocks')(x, True)
      return x
    for i in range(2):
      x, _ = block_cls(name=f'block_{i}')(x, True)
    return x


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic):
    return x + MoeLayer(num_experts=4, ffn_dim=F, name='moe')(x, deterministic), None


@pytest.mark.parametrize('scan', [False, True])
def test_collectors_average_over_layers_plain_and_scanned(scan):
  model = _Stack(scan=scan)
  x = _inputs()
  variables = nn.unbox(model.init(jax.random.key(0), x))
  _, state = model.apply(variables, x, mutable=['intermediates'])
  lbl = [v for path, v in jax.tree_util.tree_leaves_with_path(state)
         if 'load_balancing_loss' in jax.tree_util.keystr(path)]
  values = np.concatenate([np.ravel(v) for v in lbl])
  assert values.size == 2  # one value per layer, stacked by nn.scan or sown twice
  np.testing.assert_allclose(collect_aux_losses(state)['load_balancing_loss'], values.mean(),
                             rtol=1e-6)
  usage = collect_routing_metrics(state)['expert_usage']
  assert usage.shape == (4,)
  np.testing.assert_allclose(usage.sum(), 1.0, rtol=1e-6)


def test_scan_remat_jit_grad_give_the_plain_numbers():
  x = _inputs()
  plain, scanned = _Stack(), _Stack(scan=True, remat=True)
  params = nn.unbox(plain.init(jax.random.key(0), x))['params']
  stacked = {'blocks': jax.tree.map(lambda a, b: jnp.stack([a, b]), params['block_0'],
                                    params['block_1'])}

  def loss(model, p):
    out, state = model.apply({'params': p}, x, mutable=['intermediates'])
    return jnp.mean(out**2) + collect_aux_losses(state)['load_balancing_loss']

  loss_plain, grads_plain = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  loss_scan, grads_scan = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
  np.testing.assert_allclose(loss_scan, loss_plain, rtol=1e-6)
  for i in range(2):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
                 grads_scan['blocks'], grads_plain[f'block_{i}'])


CONFIG_ERRORS = [
    (dict(num_experts=0), 'num_experts'),
    (dict(num_experts=2, num_selected_experts=3), 'num_selected_experts'),
    (dict(num_selected_experts=0), 'num_selected_experts'),
    (dict(train_capacity_factor=0.0), 'train_capacity_factor'),
    (dict(eval_capacity_factor=-1.0), 'eval_capacity_factor'),
    (dict(routing='experts_choose'), 'routing'),
    (dict(batch_prioritized=True), 'batch_prioritized'),
    (dict(routing='hash'), 'routing'),
    (dict(dispatch='magic'), 'dispatch'),
    (dict(activation='tanh'), 'activation'),
    (dict(expert_dropout=1.0), 'expert_dropout'),
    (dict(min_expert_capacity=0), 'min_expert_capacity'),
    (dict(block_size=0), 'block_size'),
    (dict(block_size=48), 'block_size'),
    (dict(routing='experts_choose', causal=False, train_capacity_factor=None),
     'train_capacity_factor'),
]


@pytest.mark.parametrize('overrides,field', CONFIG_ERRORS)
def test_bad_config_errors_name_the_field(overrides, field):
  config = {"num_experts": 4, "ffn_dim": F, **overrides}
  with pytest.raises(ValueError, match=f'MoeLayer.{field}='):
    MoeLayer(**config)


def test_bad_inputs_errors():
  layer = MoeLayer(num_experts=4, ffn_dim=F, group_size=5)
  with pytest.raises(ValueError, match='group_size=5.*must divide'):
    init_layer(layer, _inputs(batch=2, length=16))
  layer = MoeLayer(num_experts=4, ffn_dim=F)
  with pytest.raises(ValueError, match='rank 3'):
    init_layer(layer, jnp.zeros((16, D)))
  with pytest.raises(ValueError, match='padding_mask must have shape'):
    layer.init(jax.random.key(0), _inputs(), True, padding_mask=jnp.ones((2, 15), bool))


def test_encoder_only_routing_allowed_without_causal():
  layer = MoeLayer(num_experts=4, ffn_dim=F, routing='experts_choose', causal=False)
  x = _inputs()
  out, state = apply_layer(layer, init_layer(layer, x), x)
  assert out.shape == x.shape
  np.testing.assert_allclose(collect_routing_metrics(state)['expert_usage'], 0.25)


def test_importing_the_layer_does_not_import_tensorflow():
  code = 'import sys, moejax; from moejax import MoeLayer; assert "tensorflow" not in sys.modules'
  subprocess.run([sys.executable, '-c', code], check=True)


def test_auto_dispatch_and_block_sizes():
  """'auto' picks the path measured fastest per backend: sorted for CPU training, never the
  per-expert scan on GPU (not measured there); the sorted path becomes 'indices' under an
  expert-parallel mesh, whose all-to-all exchanges [E, G, C, D] buffers."""
  assert jax.default_backend() == 'cpu'
  layer = MoeLayer(num_experts=4, ffn_dim=F)
  assert layer.dispatch_method(sharded=False, deterministic=False) == 'sorted'
  assert layer.dispatch_method(sharded=True, deterministic=False) == 'indices'
  einsum = layer.clone(dispatch='einsum')
  assert einsum.dispatch_method(sharded=True, deterministic=False) == 'einsum'
  assert layer.dispatch_method(sharded=False, deterministic=True) == 'sorted'
  for dropless in (False, True):
    assert auto_dispatch('cpu', dropless) == 'sorted'
    assert auto_dispatch('tpu', dropless) == 'einsum'
  # Grouped matmuls are never picked: dense masked products on CPU, not yet timed elsewhere.
  assert 'grouped' not in {auto_dispatch(backend, dropless) for backend in ('cpu', 'gpu', 'tpu')
                           for dropless in (False, True)}
  grouped = layer.clone(dispatch='grouped')
  assert grouped.dispatch_method(sharded=True, deterministic=False) == 'grouped'  # ragged exchange
  assert auto_dispatch('gpu', dropless=False) == 'einsum'
  assert auto_dispatch('gpu', dropless=True) == 'indices'
  # The largest block: twice an expert's mean load rounded up to a power of two, in [16, 1024].
  assert [default_block_size(4096, e) for e in (4, 8, 32, 100, 128, 1024)] == [
      1024, 1024, 256, 128, 64, 16]
  # The tile: a sixteenth of the block, at least 16 rows unless the block is smaller.
  assert [block_tile(b) for b in (1024, 256, 16, 4)] == [64, 16, 16, 4]


def test_one_name_for_the_ffn_width():
  """F is `ffn_dim` in every module that has it (the layer, Soft MoE, the expert weights, the
  dense FFN and ModelConfig, which hands its own to the layer); the retired names are gone."""
  import dataclasses

  from moejax import ExpertWeights, ModelConfig, SoftMoeLayer
  from moejax.models.config import MOE_FIELDS_SET_BY_MODEL
  from moejax.models.transformer import Mlp
  for cls in (MoeLayer, SoftMoeLayer, ExpertWeights, Mlp, ModelConfig):
    names = {field.name for field in dataclasses.fields(cls)}
    assert 'ffn_dim' in names and not names & {'expert_hidden_dim', 'hidden_dim', 'd_ff',
                                               'mlp_dim'}, cls
  assert MOE_FIELDS_SET_BY_MODEL['ffn_dim'] == 'ffn_dim'
