"""Sparse upcycling: the upcycled model's first forward pass is the dense model's; the train loop
starts an MoE run from a dense run's checkpoint and continues its step, schedule and data."""
import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import smoke_config
from moejax.models import ModelConfig, make_model
from moejax.train import default_config, make_optimizer
from moejax.train import loop
from moejax.train.inputs import dummy_batch, model_inputs
from moejax.upcycle import upcycle_optimizer_state, upcycle_tree

TINY = ModelConfig(vocab_size=40, num_layers=2, model_dim=16, num_heads=2, ffn_dim=32, moe_every=2,
                   num_experts=4, num_selected_experts=2, normalize_weights=True,
                   eval_capacity_factor=None)  # dropless at eval: capacity always suffices


def dense_source(config):
  return dataclasses.replace(config, dense_baseline=True, num_selected_experts=1)


@functools.lru_cache(maxsize=None)
def init_params(config, seed):
  """Initial params (unboxed), computed once per (config, seed) for the whole module."""
  batch = dummy_batch(config, 2, 12)
  init = lambda: make_model(config).init(jax.random.key(seed), *model_inputs(config, batch), True)
  return nn.unbox(jax.jit(init)()['params'])


@functools.partial(jax.jit, static_argnums=0)
def logits(config, params, tokens):
  batch = {'targets': tokens, 'weights': jnp.ones(tokens.shape, jnp.float32)}
  return make_model(config).apply({'params': params}, *model_inputs(config, batch), True)


TOKENS = jax.random.randint(jax.random.key(7), (3, 12), 0, 40)


@pytest.mark.slow
@pytest.mark.parametrize('k,glu', [(1, False), (2, False), (2, True)])
def test_first_forward_pass_equals_the_dense_model(k, glu):
  config = dataclasses.replace(TINY, num_selected_experts=k, glu=glu)
  dense = init_params(dense_source(config), 0)
  upcycled = upcycle_tree(dense, init_params(config, 1))
  np.testing.assert_allclose(logits(config, upcycled, TOKENS),
                             logits(dense_source(config), dense, TOKENS), rtol=1e-5, atol=1e-5)


def test_without_normalized_weights_the_output_shrinks():
  """The equality above needs the weights normalized: Switch's raw top-2 probabilities sum to < 1,
  so the same upcycled params give other logits."""
  config = dataclasses.replace(TINY, normalize_weights=False)
  dense = init_params(dense_source(config), 0)
  upcycled = upcycle_tree(dense, init_params(config, 1))
  gap = jnp.abs(logits(config, upcycled, TOKENS) - logits(dense_source(config), dense, TOKENS))
  assert gap.max() > 1e-2


def test_experts_are_copies_routers_fresh_and_the_rest_copied():
  dense, template = init_params(dense_source(TINY), 0), init_params(TINY, 1)
  upcycled = upcycle_tree(dense, template)
  moe, mlp = upcycled['decoder']['unit_0']['block_1']['moe'], dense['decoder']['unit_0']['block_1']
  for e in range(TINY.num_experts):
    np.testing.assert_array_equal(moe['experts']['wi'][e], mlp['mlp']['wi']['kernel'])
    np.testing.assert_array_equal(moe['experts']['wo'][e], mlp['mlp']['wo']['kernel'])
  np.testing.assert_array_equal(moe['router']['dense']['kernel'],
                                template['decoder']['unit_0']['block_1']['moe']['router']['dense']
                                ['kernel'])
  np.testing.assert_array_equal(upcycled['embed']['embedding'], dense['embed']['embedding'])
  np.testing.assert_array_equal(upcycled['decoder']['unit_0']['block_0']['mlp']['wi']['kernel'],
                                dense['decoder']['unit_0']['block_0']['mlp']['wi']['kernel'])


def test_noise_makes_experts_differ_by_the_relative_std():
  dense, template = init_params(dense_source(TINY), 0), init_params(TINY, 1)
  noisy = upcycle_tree(dense, template, noise_std=0.1, rng=jax.random.key(3))
  again = upcycle_tree(dense, template, noise_std=0.1, rng=jax.random.key(3))
  kernel = dense['decoder']['unit_0']['block_1']['mlp']['wi']['kernel']  # Shape: [D, F]
  experts = noisy['decoder']['unit_0']['block_1']['moe']['experts']['wi']  # Shape: [E, D, F]
  relative = jnp.std(experts - kernel, axis=(1, 2)) / jnp.std(kernel)  # Shape: [E]
  np.testing.assert_allclose(relative, 0.1, rtol=0.1)
  assert not np.allclose(experts[0], experts[1])
  np.testing.assert_array_equal(experts, again['decoder']['unit_0']['block_1']['moe']['experts']
                                ['wi'])


def test_dense_source_of_another_width_is_refused_with_the_fix():
  wide = dataclasses.replace(TINY, dense_baseline=True)  # K = 2: width 2F
  with pytest.raises(ValueError, match='num_selected_experts=1'):
    upcycle_tree(init_params(wide, 0), init_params(TINY, 1))


def counts(opt_state):
  """The optimizer state's step counts (Adam's, the schedule's), by path."""
  flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  return {jax.tree_util.keystr(path): int(leaf) for path, leaf in flat
          if jax.tree_util.keystr(path).endswith('count')}


def test_optimizer_state_keeps_counts_and_copies_moments():
  tx = make_optimizer(default_config().train)
  dense, template = init_params(dense_source(TINY), 0), init_params(TINY, 1)
  dense_opt = jax.tree.map(lambda x: x + 1, tx.init(dense))  # counts 1, moments 1
  opt = upcycle_optimizer_state(dense_opt, tx.init(template), template)
  assert counts(opt) and set(counts(opt).values()) == {1}  # Adam's and the schedule's
  adam = opt[1][0]
  for moments in (adam.mu, adam.nu):
    moe = moments['decoder']['unit_0']['block_1']['moe']
    np.testing.assert_array_equal(moe['experts']['wo'], jnp.ones_like(moe['experts']['wo']))
    np.testing.assert_array_equal(moe['router']['dense']['kernel'], 0.0)  # fresh router
    np.testing.assert_array_equal(moments['embed']['embedding'], 1.0)


def test_adafactor_state_copies_params_shaped_statistics_and_keeps_the_rest_fresh():
  """At these tiny widths Adafactor factors nothing: its `v` is params-shaped (copied), while
  `v_row` and `v_col` hold (1,) placeholders, which cannot be copies of anything (kept fresh)."""
  train = default_config().train
  train.optimizer = 'adafactor'
  tx = make_optimizer(train)
  dense, template = init_params(dense_source(TINY), 0), init_params(TINY, 1)
  dense_opt = jax.tree.map(lambda x: x + 1, tx.init(dense))
  opt = upcycle_optimizer_state(dense_opt, tx.init(template), template)
  assert counts(opt) and set(counts(opt).values()) == {1}
  factored = opt[1][0]
  experts = factored.v['decoder']['unit_0']['block_1']['moe']['experts']['wi']
  np.testing.assert_array_equal(experts, jnp.ones_like(experts))
  for placeholder in jax.tree.leaves((factored.v_row, factored.v_col)):
    np.testing.assert_array_equal(placeholder, 0.0)


def test_train_loop_upcycles_a_dense_run_and_continues_its_step(tmp_path, tfds_dir):
  data_dir = tfds_dir
  dense_dir, moe_dir = str(tmp_path / 'dense'), str(tmp_path / 'moe')
  dense_config = smoke_config(data_dir, num_steps=4)
  dense_config.model.update(dense_baseline=True)
  dense = loop.train(dense_config, dense_dir, quiet=True)

  config = smoke_config(data_dir, num_steps=4)  # no steps left: the upcycled state, evaluated
  config.model.update(num_selected_experts=2, normalize_weights=True, eval_capacity_factor=None)
  config.upcycle.update(from_workdir=dense_dir, step=4)
  start = loop.train(config, moe_dir, quiet=True)
  assert start['step'] == 4
  np.testing.assert_allclose(start['eval']['nll'], dense['eval']['nll'], rtol=1e-5)
  experts = start['state'].params['decoder']['unit_0']['block_1']['moe']['experts']['wi']
  kernel = dense['state'].params['decoder']['unit_0']['block_1']['mlp']['wi']['kernel']
  np.testing.assert_array_equal(experts, jnp.broadcast_to(kernel, experts.shape))
  assert set(counts(start['state'].opt_state).values()) == {4}  # the dense run's schedule goes on

  config.train.num_steps = 6  # resumes the upcycled run's own checkpoint
  summary = loop.train(config, moe_dir, quiet=True)
  with open(os.path.join(moe_dir, 'metrics.jsonl')) as f:
    train_steps = [json.loads(line)['step'] for line in f if '"train"' in line]
  assert summary['step'] == 6 and train_steps == [5, 6]
  assert np.isfinite(summary['eval']['nll']) and summary['eval']['nll'] != start['eval']['nll']
