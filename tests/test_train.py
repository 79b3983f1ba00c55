"""Training: loss goes down, exact resume, checkpoints on another mesh, non-finite steps, metrics."""
import json
import os

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers import smoke_config
from moejax import data as data_lib
from moejax.models import ModelConfig, make_model
from moejax.train import (IncompatibleCheckpointError, default_config, init_state, learning_rate_schedule,
                          make_mesh, make_optimizer, make_train_step, param_specs,
                          state_shardings, train_step)
from moejax.train import loop, sampling
from moejax.train.config import check_config, model_config
from moejax.train.evaluation import evaluate
from moejax.train.resume import load
from moejax.train.inputs import dummy_batch


@pytest.fixture
def data_dir(tfds_dir):
  return tfds_dir


@pytest.fixture(scope='module')
def run20(tfds_dir, tmp_path_factory):
  """A 20-step run of the smoke config on one device (shared by several tests)."""
  workdir = str(tmp_path_factory.mktemp('run20'))
  config = smoke_config(tfds_dir, num_steps=20)
  summary = loop.train(config, workdir, quiet=True)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return config, workdir, summary, lines


def _params(state):
  return jax.device_get(state.params)


def test_20_steps_reduce_the_loss(run20):
  _, _, summary, lines = run20
  losses = [l['loss'] for l in lines if l['split'] == 'train']
  assert len(losses) == 20 and summary['step'] == 20
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses


def test_metrics_have_loss_parts_and_per_layer_routing(run20):
  config, workdir, _, lines = run20
  train = [l for l in lines if l['split'] == 'train'][-1]
  alpha, beta = config.train.load_balancing_loss_coef, config.train.router_z_loss_coef
  np.testing.assert_allclose(train['loss'], train['nll'] + alpha * train['load_balancing_loss']
                             + beta * train['router_z_loss'], rtol=1e-5)
  usage = train['expert_usage/decoder/unit_0/block_1']  # the one sparse block of 2
  assert len(usage) == 4 and abs(sum(usage) - 1) < 1e-5
  for name in ('tokens_per_sec', 'fraction_dropped', 'router_z_loss', 'skipped', 'grad_norm',
               'fraction_dropped/decoder/unit_0/block_1'):
    assert name in train
  evals = [l for l in lines if l['split'] == 'eval']
  assert evals and evals[-1]['step'] == 20 and 'nats_per_char' in evals[-1]
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert any(name.startswith('events.out.tfevents') for name in events)


def test_keeps_the_last_k_checkpoints(run20):
  config, workdir, _, _ = run20
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert steps == [16, 18, 20]  # every 2 steps, keep 3


def test_stop_and_resume_gives_bit_identical_params(run20, data_dir, tmp_path):
  config, _, summary, _ = run20
  first = loop.train(smoke_config(data_dir, num_steps=10), str(tmp_path), quiet=True)
  assert first['step'] == 10
  resumed = loop.train(smoke_config(data_dir, num_steps=20), str(tmp_path), quiet=True)
  assert resumed['step'] == 20
  jax.tree.map(np.testing.assert_array_equal, _params(resumed['state']),
               _params(summary['state']))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed['state'].opt_state),
               jax.device_get(summary['state'].opt_state))


def test_checkpoint_from_one_device_restores_on_data2_expert4_mesh(run20):
  config, workdir, summary, _ = run20
  config = config.copy_and_resolve_references()
  config.mesh.update(data=2, expert=4)
  run, state = load(config, workdir)
  wi = state.params['decoder']['unit_0']['block_1']['moe']['experts']['wi']  # [E, D, F]
  assert wi.sharding.spec == P('expert', None, 'model') and wi.sharding.mesh.shape['data'] == 2
  assert {s.data.shape for s in wi.addressable_shards} == {(1, 32, 64)}
  jax.tree.map(np.testing.assert_array_equal, _params(state), _params(summary['state']))
  on_mesh = evaluate(run, state.params)
  np.testing.assert_allclose(on_mesh['nll'], summary['eval']['nll'], rtol=1e-5)
  np.testing.assert_allclose(on_mesh['expert_usage/decoder/unit_0/block_1'],
                             summary['eval']['expert_usage/decoder/unit_0/block_1'], atol=1e-6)


def test_resuming_with_other_shapes_names_the_fields(run20, data_dir):
  _, workdir, _, _ = run20
  config = smoke_config(data_dir, num_steps=30)
  config.model.num_experts = 8
  with pytest.raises(IncompatibleCheckpointError, match=r'model\.num_experts: 4 \(saved\) -> 8 \(now\)'):
    loop.train(config, workdir, quiet=True)


class _NanBatches:
  """The training batches of the data pipeline, those numbered first_nan..last_nan with NaN loss
  weights; its state is the pipeline's."""

  def __init__(self, batches, first_nan, last_nan):
    self.batches, self.first_nan, self.last_nan = batches, first_nan, last_nan

  def __next__(self):
    number = self.batches.get_state()['next_index']
    batch = next(self.batches)
    if self.first_nan <= number and (self.last_nan is None or number <= self.last_nan):
      batch = dict(batch, weights=np.full_like(batch['weights'], np.nan))
    return batch

  def get_state(self):
    return self.batches.get_state()


def _nan_batches_from(monkeypatch, first_nan, last_nan=None):
  real = data_lib.train_batches
  monkeypatch.setattr(data_lib, 'train_batches',
                      lambda *args: _NanBatches(real(*args), first_nan, last_nan))


def test_nan_batch_is_skipped_and_counted(data_dir, tmp_path, monkeypatch):
  _nan_batches_from(monkeypatch, 2, 2)
  summary = loop.train(smoke_config(data_dir, num_steps=5), str(tmp_path), quiet=True)
  assert summary['step'] == 5 and summary['nonfinite_total'] == 1
  with open(tmp_path / 'metrics.jsonl') as f:
    skipped = {l['step']: l['skipped'] for l in map(json.loads, f) if l['split'] == 'train'}
  assert skipped == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0}  # batch number 2 is step 3
  assert np.isfinite(summary['eval']['nll'])


def test_nonfinite_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch):
  _nan_batches_from(monkeypatch, 4)
  config = smoke_config(data_dir, num_steps=12, max_nonfinite_in_a_row=3)
  with pytest.raises(loop.TrainingDiverged, match='up to step 7'):
    loop.train(config, str(tmp_path), quiet=True)
  # Checkpoints every 2 steps: 2 and 4 are good; 6 fell in the non-finite streak (steps 5-7) and
  # was not written, so the last checkpoint is the last good one.
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert steps[-2:] == [2, 4]


@pytest.fixture(scope='module')
def tiny_step():
  config = ModelConfig(vocab_size=40, num_layers=2, model_dim=32, num_heads=2, ffn_dim=64,
                       num_experts=4)
  model, tx = make_model(config), make_optimizer(default_config().train)
  batch = dummy_batch(config, 8, 16)
  batch['targets'] = jax.random.randint(jax.random.key(1), (8, 16), 3, 40)
  return model, tx, batch


def test_nonfinite_step_leaves_params_and_optimizer_state_unchanged(tiny_step):
  model, tx, batch = tiny_step
  step = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, alpha=1e-2, beta=1e-3))
  state = jax.jit(lambda: init_state(model, tx, batch, 0))()
  state, _ = step(state, batch)
  nan_batch = dict(batch, weights=batch['weights'].at[0, 0].set(jnp.nan))
  after, metrics = step(state, nan_batch)
  assert int(metrics['skipped']) == 1 and int(after.nonfinite_total) == 1
  assert int(after.nonfinite_in_a_row) == 1 and int(after.step) == int(state.step) + 1
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state),
               (state.params, state.opt_state))
  good, metrics = step(after, batch)
  assert int(metrics['skipped']) == 0 and int(good.nonfinite_in_a_row) == 0
  assert int(good.nonfinite_total) == 1
  assert not np.array_equal(good.params['logits']['kernel'], after.params['logits']['kernel'])


@pytest.mark.slow
def test_train_step_on_a_data2_expert4_mesh_matches_one_device(tiny_step):
  model, tx, batch = tiny_step
  init = lambda: init_state(model, tx, batch, 0)
  one, one_metrics = make_train_step(model, tx, 1e-2, 1e-3)(jax.jit(init)(), batch)
  mesh = make_mesh(data=2, expert=4)
  state = jax.jit(init)()
  shardings = state_shardings(state, param_specs(model, batch), mesh)
  state = jax.device_put(state, shardings)
  eight, eight_metrics = make_train_step(model, tx, 1e-2, 1e-3, mesh, shardings)(state, batch)
  for tree in (eight.params, eight.opt_state[1][0].mu):  # AdamW's first moment follows its param
    wi = tree['decoder']['unit_0']['block_1']['moe']['experts']['wi']  # [E, D, F]
    assert wi.sharding.spec == P('expert', None, 'model')
    assert {s.data.shape for s in wi.addressable_shards} == {(1, 32, 64)}
  np.testing.assert_allclose(eight_metrics['loss'], one_metrics['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               jax.device_get(eight.params), jax.device_get(one.params))


@pytest.mark.slow
def test_adafactor_with_t5_rsqrt_schedule_trains(tiny_step):
  model, _, batch = tiny_step
  train = default_config().train
  train.update(optimizer='adafactor', schedule='rsqrt', learning_rate=1e-2, warmup_steps=4)
  schedule = learning_rate_schedule(train)
  np.testing.assert_allclose([schedule(s) for s in (0, 4, 16, 64)], [1e-2, 1e-2, 5e-3, 2.5e-3],
                             rtol=1e-6)
  tx = make_optimizer(train)
  step = make_train_step(model, tx, 1e-2, 1e-3)
  state = jax.jit(lambda: init_state(model, tx, batch, 0))()
  losses = []
  for _ in range(10):
    state, metrics = step(state, batch)
    losses.append(float(metrics['nll']))
  assert losses[-1] < losses[0] - 0.3, losses


def test_bad_train_config_names_the_field():
  config = default_config()
  config.train.optimizer = 'sgdd'
  with pytest.raises(ValueError, match=r"^train.optimizer='sgdd' is invalid: it must be one of "
                                       r"\('adamw', 'adafactor'\)"):
    check_config(config)
  config = default_config()
  config.task = 'span_corruption'
  with pytest.raises(ValueError, match='model.kind'):
    model_config(config, 300)


@pytest.mark.slow
def test_encoder_decoder_trains_on_span_corruption_and_fills_a_span(data_dir, tmp_path):
  config = smoke_config(data_dir, num_steps=12, learning_rate=1e-2)
  config.task, config.model.kind = 'span_corruption', 'encoder_decoder'
  config.eval.every_steps = 6
  summary = loop.train(config, str(tmp_path), quiet=True)
  with open(tmp_path / 'metrics.jsonl') as f:
    evals = [l['nll'] for l in map(json.loads, f) if l['split'] == 'eval']
  assert len(evals) == 2 and evals[1] < evals[0]
  assert 'expert_usage/encoder/unit_0/block_1' in summary['eval']  # both stacks route
  assert 'expert_usage/decoder/unit_0/block_1' in summary['eval']
  run = summary['run']
  prompt = sampling.encode_prompt(run, 'It was <X> night.')
  assert run.model_config.vocab_size - 1 in prompt  # the first sentinel
  text = sampling.sample_text(run, summary['state'].params, 'It was <X> night.', 10, 0.0, 0)
  assert isinstance(text, str) and '<X>' not in text


@pytest.mark.slow
def test_one_adamw_step_is_the_same_scanned_and_looped():
  """Weight decay picks leaves by name: under scan_layers the stacked norm scales are 2-D, and
  still are not decayed, so a scanned model takes the looped model's step, leaf by leaf."""
  fields = dict(vocab_size=40, num_layers=4, model_dim=16, num_heads=2, ffn_dim=32,
                num_experts=4, router_bias=True)
  looped, scanned = (make_model(ModelConfig(scan_layers=scan, **fields)) for scan in (False, True))
  rows = jnp.zeros((1, 8), jnp.int32)
  params = looped.init(jax.random.key(0), rows, rows > -1, True)['params']
  units = [params['decoder'][f'unit_{i}'] for i in range(2)]
  stack = lambda tree: {**{k: v for k, v in tree.items() if not k.startswith('unit_')},
                        'units': jax.tree.map(lambda *u: jnp.stack(u), *units)}
  stacked = {**params, 'decoder': stack(params['decoder'])}
  assert jax.tree.structure(stacked) == jax.tree.structure(
      jax.eval_shape(lambda: scanned.init(jax.random.key(0), rows, rows > -1, True))['params'])
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape),
                       params)
  stacked_grads = {**grads, 'decoder': {**{k: v for k, v in grads['decoder'].items()
                                           if not k.startswith('unit_')},
                                        'units': jax.tree.map(
                                            lambda *u: jnp.stack(u),
                                            *[grads['decoder'][f'unit_{i}'] for i in range(2)])}}
  train = default_config().train
  train.update(weight_decay=0.5, warmup_steps=0, schedule='constant', learning_rate=0.1)
  tx = make_optimizer(train)

  @jax.jit
  def step(p, g):
    updates, _ = tx.update(g, tx.init(p), p)
    return optax.apply_updates(p, updates)
  one, two = step(params, grads), step(stacked, stacked_grads)
  for i in range(2):  # equal up to float32 rounding (XLA fuses stacked arrays differently)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 one['decoder'][f'unit_{i}'], jax.tree.map(lambda x: x[i], two['decoder']['units']))
  scale = 'decoder', 'unit_0', 'block_0', 'pre_ffn_norm', 'scale'
  assert two['decoder']['units']['block_0']['pre_ffn_norm']['scale'].ndim == 2
  before, after = params, one
  for key in scale:
    before, after = before[key], after[key]
  np.testing.assert_allclose(after, before - 0.1 * np.sign(grads['decoder']['unit_0']['block_0'][
      'pre_ffn_norm']['scale']), atol=1e-4)  # Adam's first step: about lr * sign(g), no decay
