"""The layer in models written outside moejax: a linen model scanned with Flax's plain arguments,
and Flax NNX (the `moejax.nnx.MoeLayer` module, numbers equal to the linen layer's)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import moejax
import moejax.nnx
from moejax import collect_aux_losses, collect_decisions, collect_routing_metrics, sharding

D, F, E, B, L = 16, 32, 4, 8, 16


class Block(nn.Module):
  """A user's pre-norm block with the MoE layer in place of its FFN; nn.scan's signature."""

  @nn.compact
  def __call__(self, x, _):
    y = moejax.MoeLayer(num_experts=E, ffn_dim=F, name='moe')(nn.LayerNorm()(x), False)
    return x + y, None


class ScannedModel(nn.Module):
  """Three blocks under nn.scan with the arguments Flax's docs show, nothing moejax-specific."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(64, D)(tokens)
    blocks = nn.scan(Block, variable_axes={'params': 0, 'intermediates': 0},
                     split_rngs={'params': True}, length=3)
    x, _ = blocks(name='blocks')(x, None)
    return nn.Dense(64)(x)


def _task(seed=0):
  """Predict each token's successor mod 64: tokens [B, L] and targets [B, L]."""
  tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, 64)
  return tokens, (tokens + 1) % 64


@pytest.mark.slow
def test_plainly_scanned_foreign_model_trains_and_collects_aux_losses():
  model = ScannedModel()
  tokens, targets = _task()
  params = model.init(jax.random.key(0), tokens)['params']
  assert params['blocks']['moe']['experts']['wi'].shape == (3, E, D, F)  # plain arrays, stacked
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      logits, state = model.apply({'params': params}, tokens, mutable=['intermediates'])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      aux = collect_aux_losses(state)
      return nll + 1e-2 * aux['load_balancing_loss'], (nll, aux)
    (_, (nll, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, nll, aux

  opt_state, losses = tx.init(params), []
  for _ in range(30):
    params, opt_state, nll, aux = step(params, opt_state)
    losses.append(float(nll))
    assert np.isfinite(aux['load_balancing_loss']) and np.isfinite(aux['router_z_loss'])
  assert losses[-1] < 0.5 * losses[0], losses
  # Sharding names come from the parameter paths, a 'layers' axis for the scan's.
  axes = sharding.logical_axes(params)
  assert tuple(axes['blocks']['moe']['experts']['wi']) == ('layers', 'expert', 'embed', 'mlp')
  assert tuple(sharding.param_specs(params)['blocks']['moe']['experts']['wo']) == (
      None, 'expert', 'model', None)  # [layers, E, F, D]: E over 'expert', F over 'model'
  assert tuple(axes['Embed_0']['embedding']) == (None, None)


@pytest.mark.slow
def test_decisions_of_a_scanned_foreign_model_come_per_layer():
  tokens, _ = _task()
  model = ScannedModel()
  params = model.init(jax.random.key(0), tokens)['params']

  class WithDecisions(ScannedModel):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(64, D)(tokens)
      blocks = nn.scan(Block, variable_axes={'params': 0, 'decisions': 0},
                       split_rngs={'params': True}, length=3)
      return blocks(name='blocks')(x, None)[0]
  _, state = WithDecisions().apply({'params': params}, tokens, mutable=['decisions'])
  decisions = collect_decisions(state)
  assert sorted(decisions) == ['blocks[0]', 'blocks[1]', 'blocks[2]']
  assert decisions['blocks[1]'].expert_index.shape == (B, L, 1)  # [G, S, K], one group per row


def _nnx_and_linen(**fields):
  layer = moejax.nnx.MoeLayer(D, num_experts=E, ffn_dim=F, rngs=nnx.Rngs(0), **fields)
  params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))['moe']
  return layer, moejax.MoeLayer(num_experts=E, ffn_dim=F, **fields), params


@pytest.mark.parametrize('fields', [
    dict(), pytest.param(dict(num_selected_experts=2, dispatch='einsum'), marks=pytest.mark.slow),
    pytest.param(dict(router='cosine', num_selected_experts=2, glu=True), marks=pytest.mark.slow)])
def test_nnx_layer_gives_the_linen_numbers(fields):
  layer, linen_layer, params = _nnx_and_linen(**fields)
  x = jax.random.normal(jax.random.key(1), (2, L, D))
  mask = jnp.ones((2, L), bool).at[1, -4:].set(False)
  for deterministic in (True, False):
    out = layer(x, deterministic, padding_mask=mask)
    nnx_aux = collect_aux_losses(nnx.pop(layer, nnx.Intermediate))
    expected, state = linen_layer.apply({'params': params}, x, deterministic, padding_mask=mask,
                                        mutable=['intermediates'])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    for name, value in collect_aux_losses(state).items():
      np.testing.assert_allclose(nnx_aux[name], value, rtol=1e-6)


class NnxModel(nnx.Module):
  """A user's NNX model: embedding, one MoE block, output projection."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(64, D, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.moe = moejax.nnx.MoeLayer(D, num_experts=E, ffn_dim=F, num_selected_experts=2,
                                   jitter_noise=0.01, rngs=rngs)
    self.out = nnx.Linear(D, 64, rngs=rngs)

  def __call__(self, tokens, deterministic=False):
    x = self.embed(tokens)
    return self.out(x + self.moe(self.norm(x), deterministic))


@pytest.mark.slow
def test_nnx_model_trains_50_steps_with_nnx_optimizer():
  model = NnxModel(nnx.Rngs(params=0, jitter=1))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  tokens, targets = _task()

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits = model(tokens)
      aux = collect_aux_losses(nnx.pop(model, nnx.Intermediate))
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
      return nll + 1e-2 * aux['load_balancing_loss'] + 1e-3 * aux['router_z_loss'], nll
    (_, nll), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return nll

  losses = [float(step(model, optimizer)) for _ in range(50)]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.3 * losses[0], losses[::10]
  model(tokens, deterministic=True)
  metrics = collect_routing_metrics(nnx.pop(model, nnx.Intermediate))
  np.testing.assert_allclose(metrics['expert_usage'].sum(), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_nnx_balancing_bias_records_the_load_and_moves_against_it():
  layer = moejax.nnx.MoeLayer(D, num_experts=E, ffn_dim=F, balancing_bias=True,
                              rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, L, D))
  layer(x, False)
  nnx.pop(layer, nnx.Intermediate)
  load = np.asarray(layer.moe.load.get_value())  # this call's expert usage, [E]
  np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-6)
  layer.update_balancing_bias(0.1)
  np.testing.assert_allclose(layer.moe.bias.get_value(), 0.1 * np.sign(load.mean() - load),
                             atol=1e-7)
