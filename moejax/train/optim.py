"""Optimizers: AdamW or Adafactor, a learning-rate schedule, global-norm gradient clipping."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from moejax.checks import ConfigError


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
  if train.schedule == 'constant':
    return optax.constant_schedule(lr)
  raise ConfigError('schedule', train.schedule, "it must be 'rsqrt', 'cosine' or 'constant'",
                    'train')


def _decay_mask(params):
  """Weight decay on matrices only (not norms' scales or biases)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train)
  if train.optimizer == 'adamw':
    optimizer = optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                            mask=_decay_mask)
  elif train.optimizer == 'adafactor':
    optimizer = optax.adafactor(schedule, weight_decay_rate=train.weight_decay or None,
                                weight_decay_mask=_decay_mask)
  else:
    raise ConfigError('optimizer', train.optimizer, "it must be 'adamw' or 'adafactor'", 'train')
  return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), optimizer)
