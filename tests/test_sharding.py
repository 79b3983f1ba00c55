"""Expert parallelism on 8 simulated CPU devices: the sharded layer equals the one-device layer."""
import functools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROUTING_OPTIONS, perturbed
from moejax import MoeLayer, collect_aux_losses, collect_routing_metrics, sharding

D, F = 8, 16
BATCH, LENGTH = 16, 8
MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


def _layer(num_experts, k, overflow, **overrides):
  return MoeLayer(num_experts=num_experts, ffn_dim=F, num_selected_experts=k,
                  eval_capacity_factor=0.5 if overflow else 4.0, min_expert_capacity=1,
                  router_init_scale=5.0, **overrides)


def _data(seed=0):
  x = jax.random.normal(jax.random.key(seed), (BATCH, LENGTH, D))
  padding_mask = jnp.ones((BATCH, LENGTH), bool).at[3, -3:].set(False).at[12, :5].set(False)
  return x, padding_mask


def _loss(layer, variables, x, padding_mask):
  out, state = layer.apply(variables, x, True, padding_mask=padding_mask,
                           mutable=['intermediates'])
  aux = collect_aux_losses(state)
  loss = jnp.sum(out * jnp.cos(out)) + aux['load_balancing_loss'] + aux['router_z_loss']
  return loss, (out, collect_routing_metrics(state))


@functools.lru_cache(maxsize=None)
def _grad_fn(layer):
  return jax.jit(jax.value_and_grad(functools.partial(_loss, layer), has_aux=True))


@functools.lru_cache(maxsize=None)
def _variables(layer):
  """The layer's variables, initialized on `_data()`."""
  return layer.init(jax.random.key(1), _data()[0], True)


@functools.lru_cache(maxsize=None)
def _reference(layer):
  """Loss, output, metrics and gradients of the layer on one device."""
  x, padding_mask = _data()
  variables = _variables(layer)
  (loss, (out, metrics)), grads = _grad_fn(layer)(nn.unbox(variables), x, padding_mask)
  return variables, loss, out, metrics, grads


def _sharded(layer, variables, mesh):
  x, padding_mask = _data()
  params = sharding.shard_params(variables, mesh)
  x, padding_mask = sharding.shard_batch((x, padding_mask), mesh)
  with jax.set_mesh(mesh):
    return params, _grad_fn(layer)(params, x, padding_mask)


def _assert_close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5), a, b)


@pytest.mark.parametrize('data,expert,num_experts,k,overflow', [
    pytest.param(data, expert, e, k, overflow,
                 id=f'{"overflow" if overflow else "roomy"}-{k}-{e}-{data}-{expert}',
                 marks=() if (data, expert, e, k, overflow) == (2, 4, 8, 2, True) else pytest.mark.slow)
    for overflow in (True, False) for k in (1, 2) for e in (8, 16) for data, expert in MESHES])
def test_sharded_layer_equals_single_device(data, expert, num_experts, k, overflow):
  layer = _layer(num_experts, k, overflow)
  variables, loss, out, metrics, grads = _reference(layer)
  mesh = sharding.make_mesh(data=data, expert=expert)
  params, ((loss_s, (out_s, metrics_s)), grads_s) = _sharded(layer, variables, mesh)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  _assert_close(out_s, out)
  _assert_close(metrics_s, metrics)
  _assert_close(grads_s, grads)
  # Each device holds E / expert_axis experts.
  for name in ('wi', 'wo'):
    shard_shape = params['params']['experts'][name].addressable_shards[0].data.shape
    assert shard_shape[0] == num_experts // expert
  assert (float(metrics['fraction_dropped']) > 0.2) == overflow


@pytest.mark.parametrize('dispatch,routing', [
    pytest.param(dispatch, routing, id=f'{routing}-{dispatch}',
                 marks=() if (dispatch, routing) in {('indices', 'tokens_choose'),
                                                     ('einsum', 'experts_choose')}
                 else pytest.mark.slow)
    for routing in ('tokens_choose', 'experts_choose', 'dense')
    for dispatch in ('einsum', 'indices', 'sorted', 'grouped')])
def test_sharded_dispatch_methods_and_routings(dispatch, routing):
  layer = _layer(8, 2, True, dispatch=dispatch, routing=routing, causal=False)
  variables, loss, out, metrics, grads = _reference(layer)
  _, ((loss_s, (out_s, metrics_s)), grads_s) = _sharded(layer, variables,
                                                       sharding.make_mesh(data=2, expert=4))
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  _assert_close((out_s, metrics_s, grads_s), (out, metrics, grads))


@pytest.mark.slow
def test_sharded_dropless_equals_single_device():
  """Dropless (C = S) under a 2 x 4 mesh exchanges [E, G, S, D] buffers; same numbers as the
  one-device sorted path, and nothing is dropped."""
  layer = MoeLayer(num_experts=8, ffn_dim=F, num_selected_experts=2,
                   eval_capacity_factor=None, router_init_scale=5.0)
  variables, loss, out, metrics, grads = _reference(layer)
  _, ((loss_s, (out_s, metrics_s)), grads_s) = _sharded(layer, variables,
                                                       sharding.make_mesh(data=2, expert=4))
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  _assert_close((out_s, metrics_s, grads_s), (out, metrics, grads))
  assert float(metrics['fraction_dropped']) == 0


@pytest.mark.parametrize('data,expert,model,capacity_factor', [
    pytest.param(data, expert, model, factor, id=f'{factor}-{data}-{expert}-{model}',
                 marks=() if (data, expert, model, factor) == (2, 4, 1, None)
                 else pytest.mark.slow)
    for factor in (None, 0.5) for data, expert, model in [(1, 8, 1), (2, 4, 1), (4, 2, 1),
                                                          (2, 2, 2)]])
def test_sharded_grouped_ragged_exchange_equals_single_device(data, expert, model,
                                                              capacity_factor):
  """dispatch='grouped' under a mesh exchanges only the dispatched rows (ragged all-to-all,
  emulated on CPU): outputs, metrics and gradients (parameters and inputs: these come back
  through both exchanges) of the one-device layer, dropless and with overflow, with F split
  over 'model' too; GLU experts."""
  layer = MoeLayer(num_experts=8, ffn_dim=F, num_selected_experts=2, dispatch='grouped',
                   eval_capacity_factor=capacity_factor, min_expert_capacity=1,
                   router_init_scale=5.0, glu=True)
  variables, loss, out, metrics, grads = _reference(layer)
  mesh = sharding.make_mesh(data=data, expert=expert, model=model)
  params, ((loss_s, (out_s, metrics_s)), grads_s) = _sharded(layer, variables, mesh)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  _assert_close((out_s, metrics_s, grads_s), (out, metrics, grads))
  input_grad = jax.jit(jax.grad(lambda v, x, m: _loss(layer, v, x, m)[0], argnums=1))
  x, padding_mask = _data()
  expected = input_grad(variables, x, padding_mask)
  x, padding_mask = sharding.shard_batch((x, padding_mask), mesh)
  with jax.set_mesh(mesh):
    _assert_close(input_grad(params, x, padding_mask), expected)
  assert (float(metrics['fraction_dropped']) > 0.2) == (capacity_factor is not None)


@pytest.mark.parametrize('options,dispatch,mesh_shape', [
    pytest.param('sigmoid_groups_biased_experts', 'grouped', (2, 2, 2)),
    pytest.param('sigmoid_groups_biased_experts', 'indices', (2, 2, 2), marks=pytest.mark.slow),
    pytest.param('softmax_after_top_k', 'einsum', (1, 8, 1), marks=pytest.mark.slow),
    pytest.param('softmax_after_top_k', 'grouped', (4, 2, 1), marks=pytest.mark.slow)])
def test_sharded_routing_options_equal_single_device(options, dispatch, mesh_shape):
  """The new routing and expert options (with expert biases not zero, and F split over 'model':
  the output bias counted once) under a mesh: the one-device loss, outputs, metrics, gradients."""
  layer = _layer(8, 2, True, dispatch=dispatch, **ROUTING_OPTIONS[options])
  variables = perturbed(_variables(layer))
  x, padding_mask = _data()
  (loss, (out, metrics)), grads = _grad_fn(layer)(variables, x, padding_mask)
  _, ((loss_s, (out_s, metrics_s)), grads_s) = _sharded(layer, variables,
                                                       sharding.make_mesh(*mesh_shape))
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  _assert_close((out_s, metrics_s, grads_s), (out, metrics, grads))
  assert float(metrics['fraction_dropped']) > 0.2


@pytest.mark.parametrize('glu', [False, True])
def test_model_parallel_hidden_dim(glu):
  """F split over 'model' (2 x 2 x 2 mesh): same numbers, each device holds F / 2 columns."""
  layer = _layer(8, 2, True, glu=glu)
  variables, loss, out, metrics, grads = _reference(layer)
  mesh = sharding.make_mesh(data=2, expert=2, model=2)
  params, ((loss_s, (out_s, _)), grads_s) = _sharded(layer, variables, mesh)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
  _assert_close((out_s, grads_s), (out, grads))
  assert params['params']['experts']['wi'].addressable_shards[0].data.shape == (4, D, F // 2)
  assert params['params']['experts']['wo'].addressable_shards[0].data.shape == (4, F // 2, D)


def _compiled_forward(layer, variables, mesh):
  x, padding_mask = _data()
  params = sharding.shard_params(variables, mesh)
  x = sharding.shard_batch(x, mesh)
  with jax.set_mesh(mesh):
    return jax.jit(lambda p, x: layer.apply(p, x, True)).lower(params, x).compile().as_text()


def test_hlo_has_all_to_all_and_no_all_gather():
  layer = _layer(8, 2, False)
  variables = _variables(layer)  # no reference numbers needed: the HLO is read
  hlo = _compiled_forward(layer, variables, sharding.make_mesh(data=2, expert=4))
  assert hlo.count(' all-to-all(') == 2
  assert ' all-gather(' not in hlo


@pytest.mark.parametrize('data,expert', [(1, 8), (2, 4), (4, 2)])
@pytest.mark.parametrize('k', [1, 2])
def test_all_to_all_bytes_equal_theory(data, expert, k):
  layer = _layer(8, k, True)
  variables = _variables(layer)
  mesh = sharding.make_mesh(data=data, expert=expert)
  per_device = sharding.all_to_all_bytes(_compiled_forward(layer, variables, mesh))
  moved = per_device * mesh.size * (expert - 1) / expert  # what leaves the devices, all of them
  num_groups = BATCH  # one group per sequence
  capacity = layer.capacity(LENGTH, deterministic=True)
  slots = num_groups * 8 * capacity  # tokens x K x capacity factor, rounded as capacity is
  assert moved == 2 * slots * D * 4 * (expert - 1) / expert


@pytest.mark.slow
def test_sharding_errors():
  mesh = sharding.make_mesh(data=2, expert=4)
  # The errors come while tracing: shapes alone (jax.eval_shape) raise them, nothing runs.
  layer = MoeLayer(num_experts=6, ffn_dim=F)
  x = jnp.zeros((8, 4, D))
  variables = jax.eval_shape(lambda x: layer.init(jax.random.key(0), x, True), x)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match='num_experts=6 must be a multiple'):
    jax.eval_shape(lambda v, x: layer.apply(v, x, True), variables, x)
  layer = MoeLayer(num_experts=8, ffn_dim=F)
  x = jnp.zeros((4, 4, D))
  variables = jax.eval_shape(lambda x: layer.init(jax.random.key(0), x, True), x)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match='do not divide over the 8 devices'):
    jax.eval_shape(lambda v, x: layer.apply(v, x, True), variables, x)
  with pytest.raises(ValueError, match='multiply to 6'):
    sharding.make_mesh(data=3, expert=2)
  with pytest.raises(ValueError, match='at most one may be -1'):
    sharding.make_mesh(data=-1, expert=-1)
  assert dict(sharding.make_mesh(expert=4).shape) == {'data': 2, 'expert': 4, 'model': 1}


def test_logical_axis_names_by_parameter_path():
  layer = MoeLayer(num_experts=8, ffn_dim=F, glu=True, num_shared_experts=1)
  variables = layer.init(jax.random.key(0), jnp.zeros((2, 4, D)), True)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(variables))  # no boxes
  logical = sharding.logical_axes(variables)['params']
  assert tuple(logical['experts']['wi']) == ('expert', 'embed', 'mlp')
  assert tuple(logical['experts']['wi_gate']) == ('expert', 'embed', 'mlp')
  assert tuple(logical['experts']['wo']) == ('expert', 'mlp', 'embed')
  assert tuple(logical['shared_experts']['wi']) == (None, 'embed', 'mlp')  # held whole
  specs = sharding.param_specs(variables)['params']
  assert tuple(specs['experts']['wi']) == ('expert', None, 'model')
  assert tuple(specs['router']['dense']['kernel']) == (None, None)
  # A leading (scan) axis is 'layers'; an optimizer moment at the same path gets the same names.
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), variables['params'])
  assert tuple(sharding.param_specs({'blocks': stacked})['blocks']['experts']['wo']) == (
      None, 'expert', 'model', None)
  moments = {'mu': {'blocks': stacked}}
  assert tuple(sharding.logical_axes(moments)['mu']['blocks']['experts']['wi']) == (
      'layers', 'expert', 'embed', 'mlp')


def test_process_rows_single_process():
  assert sharding.process_rows(sharding.make_mesh(data=2, expert=4), 16) == slice(0, 16)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


WORKER = Path(__file__).with_name('ep_worker.py')


def _worker(*args):
  return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _result(process, timeout):
  try:
    out, err = process.communicate(timeout=timeout)
  finally:
    process.kill()
  assert process.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_match_one_process():
  """2 processes x 4 CPU devices over jax.distributed train to the same losses as 1 x 8."""
  port = str(_free_port())
  workers = [_worker('--num-processes', '2', '--process-id', str(i), '--devices', '4',
                     '--port', port) for i in range(2)]
  reference = _worker('--num-processes', '1', '--devices', '8')
  results = [_result(w, timeout=120) for w in workers]
  expected = _result(reference, timeout=120)
  assert [r['process'] for r in results] == [0, 1]
  assert [r['rows'] for r in results] == [[0, 8], [8, 16]]  # each process fed its own half
  for result in results:
    assert result['devices'] == 8
    assert result['local_expert_shape'][0] == 2  # 8 experts over an expert axis of 4
    np.testing.assert_allclose(result['losses'], expected['losses'], rtol=1e-5)
  assert expected['losses'][-1] < expected['losses'][0]
  assert math.isfinite(expected['losses'][-1])
