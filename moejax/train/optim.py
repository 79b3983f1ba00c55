"""Optimizers: AdamW or Adafactor, a learning-rate schedule, global-norm gradient clipping."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('adamw', 'adafactor')  # train.optimizer
SCHEDULES = ('cosine', 'rsqrt', 'constant')  # train.schedule


def learning_rate_schedule(train) -> optax.Schedule:
  """'rsqrt': T5's inverse square root, lr * sqrt(warmup / max(step, warmup)) (constant for the
  first `warmup_steps`); 'cosine': linear warmup then cosine decay to lr / 10 at `num_steps`;
  'constant'."""
  lr, warmup = train.learning_rate, max(train.warmup_steps, 1)
  if train.schedule == 'rsqrt':
    return lambda step: lr * jnp.sqrt(warmup / jnp.maximum(step, warmup))
  if train.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(train.num_steps, warmup + 1),
                                              end_value=lr / 10)
  return optax.constant_schedule(lr)


# Parameter names that weight decay leaves alone: norms' scales, biases (the router's too), and the
# distance and cosine routers' scalars. Everything else (kernels, embeddings, expert weights,
# router centroids) decays. By name, not by rank: under `model.scan_layers` a stacked norm scale
# is 2-D, and it must train as it does unstacked.
NOT_DECAYED = ('bias', 'scale', 'log_sigma', 'log_temperature')


def decay_mask(params):
  """True for the leaves weight decay applies to (by their names, see NOT_DECAYED)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) not in NOT_DECAYED, params)


def make_optimizer(train) -> optax.GradientTransformation:
  """Gradient clipping, then `train.optimizer` on `learning_rate_schedule(train)` with weight
  decay on the leaves `decays` picks. `check_config` checks the names against OPTIMIZERS and
  SCHEDULES."""
  schedule = learning_rate_schedule(train)
  if train.optimizer == 'adamw':
    optimizer = optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                            mask=decay_mask)
  else:
    optimizer = optax.adafactor(schedule, weight_decay_rate=train.weight_decay or None,
                                weight_decay_mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), optimizer)
