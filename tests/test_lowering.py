"""The TPU and GPU programs, lowered on this CPU host and read, neither compiled nor run: every
dispatch path of the layer (forward and backward, with capacity and dropless), the ragged
exchange under a data x expert mesh, the train steps of the experiment configs on a
data x expert x model mesh in bfloat16, the KV-cache decoding step, and `moejax lower`."""
import contextlib
import os
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import MoeLayer, hlo, platforms, routing, sharding
from moejax.models import ModelConfig, make_model
from moejax.train import config as config_lib
from moejax.train import lowering, sampling

ACCELERATORS = ('tpu', 'cuda')
PATHS = ('einsum', 'indices', 'sorted', 'grouped')
CAPACITY = {'capacity': 1.0, 'dropless': None}  # eval_capacity_factor
# Mesh data=2 x expert=2 x model=2 over devices 0-7 (row-major): the devices that exchange.
EXPERT_GROUPS = {(0, 2), (1, 3), (4, 6), (5, 7)}
MODEL_GROUPS = {(0, 1), (2, 3), (4, 5), (6, 7)}


def _loss(layer: MoeLayer):
  """Forward and backward of `layer` in one program: the gradient of a loss of its output with
  respect to its params and its input."""
  def loss(params, x):
    return jnp.sum(layer.apply(params, x, True) ** 2)
  return jax.grad(loss, argnums=(0, 1))


def _lower(fn, *args, platform: str, mesh=None):
  """The StableHLO module of `jax.jit(fn)` lowered on `args` for `platform` (under `mesh`)."""
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    return hlo.module(platforms.lower(jax.jit(fn), *args, platform=platform))


def test_collectives_counted_per_call_and_loop_step_and_host_callbacks_found():
  """A psum over 8 devices in a 3-step loop, in a function called twice, runs 6 times a step;
  each run sends 2 x 7/8 of each device's 16-byte operand (ring all-reduce); a debug print is
  a host callback."""
  mesh = jax.make_mesh((8,), ('expert',), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P('expert')))

  @jax.jit
  def reduce(x):  # [8, 4], one row a device
    summed = lambda x: jax.lax.fori_loop(0, 3, lambda i, x: jax.lax.psum(x, 'expert'), x)
    return jax.shard_map(summed, mesh=mesh, in_specs=P('expert'), out_specs=P('expert'),
                         check_vma=False)(x)

  def twice(x):
    jax.debug.print('{}', x.sum())
    return reduce(reduce(x))
  program = _lower(twice, x, platform='cpu', mesh=mesh)
  found = hlo.collectives(program)  # the psum of each call
  assert {(c.kind, c.group_size, c.operand) for c in found} == {('all_reduce', 8, 'f32[1, 4]')}
  assert sum(c.calls for c in found) == 6
  assert sum(c.bytes_per_step for c in found) == round(2 * 7 / 8 * 16 * 8 * 6)
  assert hlo.op_counts(program)['stablehlo.all_reduce'] == 6
  assert hlo.host_callbacks(program) and 'callback' in hlo.host_callbacks(program)[0]


def _layer_program(dispatch: str, capacity: str, platform: str, mesh=None):
  """A small layer's forward and backward (top-2 of 4 experts) lowered for `platform`."""
  layer = MoeLayer(num_experts=4, ffn_dim=8, num_selected_experts=2, dispatch=dispatch,
                   eval_capacity_factor=CAPACITY[capacity])
  x = jax.ShapeDtypeStruct((8, 4, 4), jnp.float32)  # [B, L, D]
  params = jax.eval_shape(lambda x: layer.init(jax.random.key(0), x, True), x)
  if mesh is not None:  # placed as `sharding.shard_params` and `shard_batch` place arrays
    params = jax.tree.map(lambda p, spec: jax.ShapeDtypeStruct(
        p.shape, p.dtype, sharding=NamedSharding(mesh, spec)), params,
        sharding.param_specs(params), is_leaf=lambda p: isinstance(p, P))
    x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh))
  return _lower(_loss(layer), params, x, platform=platform, mesh=mesh)


@pytest.mark.parametrize('capacity', CAPACITY)
@pytest.mark.parametrize('platform', ACCELERATORS)
def test_every_dispatch_path_lowers_forward_and_backward(platform, capacity):
  """Each path lowers for the accelerator with its gradient, no host callback in it; grouped
  runs its expert matmuls as grouped matmuls (`ragged_dot`): 2 forward (wi, wo) and 4 backward
  (wo's and wi's weights, their inputs), the others as dense matmuls."""
  for dispatch in PATHS:
    program = _layer_program(dispatch, capacity, platform)
    counts = hlo.op_counts(program)
    assert hlo.host_callbacks(program) == []
    assert counts['chlo.ragged_dot'] == (6 if dispatch == 'grouped' else 0), dispatch
    assert counts['stablehlo.dot_general'] > 0


@pytest.mark.parametrize('capacity', CAPACITY)
def test_auto_lowers_to_the_path_of_the_platform_it_is_lowered_for(capacity):
  """dispatch='auto' lowered for a platform is, op for op, the path `auto_dispatch` picks
  there, whatever the host: sorted for CPU, einsum for TPU, for GPU einsum with capacity and
  indices dropless."""
  expected = {'cpu': 'sorted', 'tpu': 'einsum',
              'cuda': 'indices' if capacity == 'dropless' else 'einsum'}
  for platform, dispatch in expected.items():
    auto = _layer_program('auto', capacity, platform)
    assert str(auto) == str(_layer_program(dispatch, capacity, platform)), platform


@pytest.mark.parametrize('platform', (*ACCELERATORS, 'cpu'))
def test_grouped_layer_under_a_mesh_exchanges_ragged_rows(platform):
  """Under a data=2 x expert=4 mesh the grouped layer's rows travel over the expert axis
  (devices 0-3 and 4-7) in ragged all-to-alls with grouped matmuls on accelerators, with no
  trace of the CPU emulation (an equal-size all-to-all); lowered for CPU, the emulation and
  dense matmuls (XLA:CPU has neither ragged op)."""
  program = _layer_program('grouped', 'dropless', platform,
                           sharding.make_mesh(data=2, expert=4))
  exchanges = [c for c in hlo.collectives(program) if 'all_to_all' in c.kind]
  counts = hlo.op_counts(program)
  assert hlo.host_callbacks(program) == []
  assert exchanges and all(set(c.replica_groups) == {(0, 1, 2, 3), (4, 5, 6, 7)}
                           for c in exchanges)
  kinds = {c.kind for c in exchanges}
  if platform == 'cpu':
    assert kinds == {'all_to_all'} and counts['chlo.ragged_dot'] == 0
  else:  # forward: to the experts and back; backward: back (the input's gradient, too)
    assert kinds == {'ragged_all_to_all'} and len(exchanges) == 4
    assert counts['chlo.ragged_dot'] == 6


def _config(name: str, **mesh):
  config = config_lib.config_from_file(f'experiments/configs/{name}.py')
  config.mesh.update(mesh)
  config_lib.check_config(config)
  return config


def _exchange_formula(config, run, state) -> int:
  """benchmarks/RESULTS.md: each MoE layer's two all-to-alls move 2 x (G x E x C) x D x bytes
  x (n - 1) / n off their devices forward (n: the expert axis), the backward pass as much again;
  G x E x C is the capacity buffers' slots, C from the training capacity factor and the length
  of the layer's stack (an encoder's inputs, a decoder's targets); bfloat16. Each slice of the
  model axis (m devices: the experts' F split over them) exchanges the same buffers: m times
  that."""
  model = run.model_config
  batch = run.example_batch(1)
  lengths = {'encoder': batch.get('inputs', batch['targets']).shape[1],
             'decoder': batch['targets'].shape[1]}
  n, m = config.mesh.expert, config.mesh.model

  def step_bytes(length: int) -> float:
    group = model.group_size or length
    groups = config.train.batch_size * length // group
    capacity = routing.expert_capacity(group, model.num_experts, model.num_selected_experts,
                                       model.train_capacity_factor, model.min_expert_capacity)
    slots = groups * model.num_experts * capacity
    return 2 * (2 * slots * model.model_dim * 2 * (n - 1) / n) * m  # forward and backward

  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(state.params)[0]]
  return round(sum(step_bytes(lengths['encoder' if "'encoder'" in path else 'decoder'])
                   for path in paths if "'moe']['experts']['wi']" in path))


@pytest.mark.parametrize('platform', ACCELERATORS)
@pytest.mark.parametrize('name', ['switch_tiny', pytest.param('t5_tiny', marks=pytest.mark.slow)])
def test_train_step_lowers_on_a_data_expert_model_mesh(name, platform):
  """The config's train step (bfloat16) on a data=2 x expert=2 x model=2 mesh: its MoE layers
  exchange bfloat16 capacity buffers over the expert axis, as many bytes as the formula says,
  and sum the F slices of the expert outputs over the model axis; no host callback."""
  config = _config(name, data=2, expert=2, model=2)
  lowered, run, state = lowering.lower_train_step(config, platform)
  program = hlo.module(lowered)
  found = hlo.collectives(program)
  exchanges = [c for c in found if c.kind == 'all_to_all']
  assert hlo.host_callbacks(program) == []
  assert exchanges and all(set(c.replica_groups) == EXPERT_GROUPS and
                           c.operand.startswith('bf16') for c in exchanges)
  assert lowering.exchange_bytes(found) == _exchange_formula(config, run, state)
  assert any(c.kind == 'all_reduce' and set(c.replica_groups) == MODEL_GROUPS for c in found)
  assert not any(c.kind == 'ragged_all_to_all' for c in found)


@pytest.mark.parametrize('platform', ACCELERATORS)
def test_kv_cache_decoding_step_lowers(platform):
  """One decoding step of a bfloat16 MoE decoder against its cache: reads and writes the
  cache (dynamic slices), routes with top-k, no host callback and no collective."""
  config = ModelConfig(kind='decoder', vocab_size=50, num_layers=2, model_dim=32, num_heads=4,
                       ffn_dim=32, num_experts=4, num_selected_experts=2, moe_every=1,
                       dtype='bfloat16')
  decoding = make_model(config, decode_length=16)
  tokens = jnp.zeros((1, 1), jnp.int32)  # [B, T]: the next token
  variables = jax.eval_shape(lambda: decoding.init(jax.random.key(0), tokens,
                                                   jnp.ones((1, 1), jnp.bool_), True))
  program = hlo.module(platforms.lower(
      sampling._decode, decoding, {'params': variables['params']}, variables['cache'], None,
      tokens, 0.0, jax.random.key(0), platform=platform))
  counts = hlo.op_counts(program)
  assert hlo.host_callbacks(program) == [] and hlo.collectives(program) == []
  assert counts['stablehlo.dynamic_update_slice'] > 0 and counts['chlo.top_k'] > 0


def _restore_xla_flags(monkeypatch):
  """`moejax lower` asks for its mesh's devices in XLA_FLAGS, which the command lines the tests
  start inherit: put it back after the test."""
  monkeypatch.setenv('XLA_FLAGS', os.environ['XLA_FLAGS'])


def test_moejax_lower_prints_the_exchange_bytes_of_the_formula(capsys, monkeypatch):
  """`moejax lower` of switch_tiny for a TPU on 8 expert devices: the exchange's bytes per step
  equal benchmarks/RESULTS.md's formula for its shapes (einsum dispatch, capacity buffers)."""
  from moejax import cli
  _restore_xla_flags(monkeypatch)
  argv = ['moejax', 'lower', '--config', 'experiments/configs/switch_tiny.py', '--platform',
          'tpu', '--config.mesh.expert=8']
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  printed = int(re.search(r'exchange \(all-to-all\) off its devices: ([\d,]+) bytes/step',
                          out).group(1).replace(',', ''))
  config = _config('switch_tiny', expert=8)
  run = lowering.plan_run(config)
  assert printed == _exchange_formula(config, run, run.abstract_state()) == 9_175_040
  assert 'largest arrays of the train state' in out


def test_moejax_lower_says_why_in_one_line(capsys, monkeypatch):
  """A mesh larger than the process's devices (JAX started with 8), and a train step that does
  not lower for a TPU (a host callback, which a TPU program cannot hold), each exit non-zero
  with one line."""
  from moejax import cli
  from moejax.train import step
  _restore_xla_flags(monkeypatch)
  argv = ['moejax', 'lower', '--config', 'experiments/configs/switch_tiny.py']
  assert cli.main([*argv, '--config.mesh.data=16']) == 2
  assert capsys.readouterr().err.strip().count('\n') == 0

  def printing_loss(logits, targets, weights):
    jax.debug.print('loss {}', jnp.sum(logits))
    return jnp.sum(logits)
  monkeypatch.setattr(step, 'cross_entropy', printing_loss)
  assert cli.main(argv) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('moejax lower: the train step does not lower for tpu:') and '\n' not in err
