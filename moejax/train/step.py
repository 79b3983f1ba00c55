"""The train state, the loss, and the jit-compiled train and eval steps.

loss = NLL + alpha * load_balancing_loss + beta * router_z_loss (alpha, beta: train config).
A step whose loss or gradient is not finite leaves params and optimizer state unchanged and is
counted (`nonfinite_in_a_row`, `nonfinite_total`); the loop decides when to give up.

DeepSeek-V3 auxiliary-loss-free balancing (`ModelConfig.balancing_bias_rate > 0`): the MoE layers'
non-trainable 'balancing_bias_state' collection lives in `TrainState.balancing_bias_state` (None for
models without it). Each train step runs the forward pass with that collection mutable (the layers
record their expert load), then, outside the gradient,

  bias_state = update_balancing_biases(bias_state, model.config.balancing_bias_rate)

moves each layer's bias by rate * sign(mean load - load_e). Evaluation reads the bias:
`eval_step(params, batch, state.balancing_bias_state, model=model)`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.balancing import BIAS_COLLECTION, update_balancing_biases
from moejax.intermediates import collect_aux_losses, collect_routing_metrics, per_layer_metrics
from moejax.models import ModelConfig
from moejax.train.inputs import Batch, loss_weights, model_inputs

@struct.dataclass
class TrainState:
  step: jax.Array                # int32 [], batches consumed (skipped updates included)
  params: Any                    # in model.param_dtype, the routers' float32
  opt_state: Any
  rng: jax.Array                 # uint32 [2], base key; step s uses fold_in(rng, s)
  nonfinite_in_a_row: jax.Array  # int32 []
  nonfinite_total: jax.Array     # int32 []
  balancing_bias_state: Any = None  # the MoE layers' balancing biases and loads, or None


def has_moe(config: ModelConfig) -> bool:
  return config.has_sparse_layers and not config.dense_baseline


def init_state(model: nn.Module, tx: optax.GradientTransformation, batch: Batch,
               seed: int) -> TrainState:
  """Fresh state: params from `seed` (rng stream 'params'), step 0. Jit it for placement."""
  params_rng, rng = jax.random.split(jax.random.key(seed))
  variables = model.init({'params': params_rng}, *model_inputs(model.config, batch), True)
  params = variables['params']
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(rng), nonfinite_in_a_row=zero, nonfinite_total=zero,
                    balancing_bias_state=variables.get(BIAS_COLLECTION))


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean NLL over real tokens: logits [B, L, V] float32, targets, weights [B, L]."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # Shape: [B, L]
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def forward(model: nn.Module, params, batch: Batch, deterministic: bool, rng=None,
            bias_state=None, record_load: bool = False):
  """(logits [B, L, V], MoE metrics: the aux losses, routing metrics and per-layer ones, and the
  'balancing_bias_state' collection: with `record_load`, holding this batch's expert loads)."""
  rngs = {}
  if rng is not None:
    rngs = {name: jax.random.fold_in(rng, i) for i, name in enumerate(('dropout', 'jitter',
                                                                       'gating'))}
  variables, mutable = {'params': params}, ['intermediates']
  if bias_state is not None:
    variables[BIAS_COLLECTION] = bias_state
    mutable += [BIAS_COLLECTION] if record_load else []
  logits, state = model.apply(variables, *model_inputs(model.config, batch),
                              deterministic, rngs=rngs, mutable=mutable)
  bias_state = state.get(BIAS_COLLECTION, bias_state)
  if not has_moe(model.config):
    zero = jnp.zeros((), jnp.float32)
    return logits, {'load_balancing_loss': zero, 'router_z_loss': zero}, bias_state
  routing = collect_routing_metrics(state)
  return logits, {**collect_aux_losses(state), 'fraction_dropped': routing['fraction_dropped'],
                  'router_confidence': routing['router_confidence'],
                  'router_max_logit': routing['router_max_logit'],
                  **per_layer_metrics(state['intermediates'])}, bias_state


def train_step(state: TrainState, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, alpha: float, beta: float):
  """One update. Returns (new state, metrics)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    logits, moe, bias_state = forward(model, params, batch, False, rng,
                                      state.balancing_bias_state, record_load=True)
    nll = cross_entropy(logits, batch['targets'], loss_weights(batch))
    loss = nll + alpha * moe['load_balancing_loss'] + beta * moe['router_z_loss']
    return loss, ({'nll': nll, **moe}, bias_state)

  (loss, (metrics, bias_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if bias_state is not None:  # DeepSeek-V3 balancing, outside the gradient
    bias_state = update_balancing_biases(bias_state, model.config.balancing_bias_rate)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep_if_finite = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  nonfinite = (~finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      balancing_bias_state=keep_if_finite(bias_state, state.balancing_bias_state),
      nonfinite_in_a_row=(state.nonfinite_in_a_row + 1) * nonfinite,
      nonfinite_total=state.nonfinite_total + nonfinite)
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'skipped': nonfinite,
             'nonfinite_total': new_state.nonfinite_total, **metrics}
  return new_state, metrics


def eval_step(params, batch: Batch, balancing_bias_state=None, *,
              model: nn.Module) -> dict[str, jax.Array]:
  """Sums over the batch's real tokens (eval capacity factor: deterministic=True).
  balancing_bias_state: the train state's, for models with balancing biases. 'router_max_logit'
  (a max, which a token-weighted sum over batches would not keep) is a train metric only."""
  logits, moe, _ = forward(model, params, batch, True, bias_state=balancing_bias_state)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  weights = loss_weights(batch)  # Shape: [B, L]
  tokens = jnp.sum(weights)
  return {'nll_sum': jnp.sum(nll * weights), 'tokens': tokens,
          **{name: value * tokens for name, value in moe.items()
             if not name.startswith('router_max_logit')}}


def token_log_probs(params, batch: Batch, balancing_bias_state=None, *,
                    model: nn.Module) -> jax.Array:
  """log p(target) [B, L] of every position, as evaluation computes it (deterministic, the eval
  capacity factor); padding positions are included: mask them with batch['weights']."""
  logits, _, _ = forward(model, params, batch, True, bias_state=balancing_bias_state)
  return -optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])


def _on_mesh(fn, mesh: Mesh | None):
  """Run `fn` under `jax.set_mesh(mesh)` (MoeLayer's expert-parallel path reads it)."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return wrapped


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, alpha: float,
                   beta: float, mesh: Mesh | None = None, shardings: Any = None):
  """jit(train_step), to call (or trace) under `jax.set_mesh(mesh)`; with a mesh, the state
  keeps `shardings` (see `moejax.train.sharding.state_shardings`) and batches are split over
  ('data', 'expert'). The input state is donated."""
  step = functools.partial(train_step, model=model, tx=tx, alpha=alpha, beta=beta)
  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, alpha: float,
                    beta: float, mesh: Mesh | None = None, shardings: Any = None):
  """`jit_train_step`, run under the mesh."""
  return _on_mesh(jit_train_step(model, tx, alpha, beta, mesh, shardings), mesh)


def make_eval_step(model: nn.Module, mesh: Mesh | None = None, param_shardings: Any = None):
  """Jitted `eval_step(params, batch, balancing_bias_state=None)` (the bias replicated on a
  mesh)."""
  step = functools.partial(eval_step, model=model)
  if mesh is None:
    return jax.jit(step)
  replicated = NamedSharding(mesh, P())
  return _on_mesh(jax.jit(step, in_shardings=(param_shardings, sharding.batch_sharding(mesh),
                                              replicated)), mesh)
