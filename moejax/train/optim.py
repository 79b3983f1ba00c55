"""Optimizers: AdamW or Adafactor, a learning-rate schedule, global-norm gradient clipping, and a
float32 master copy of the params stored in bfloat16 (`model.param_dtype`).

A bfloat16 param cannot take most fine-tuning steps: it has 8 significant bits, so an update
smaller than 2^-9 to 2^-8 of the param rounds back to it (Adam moves a param by about lr: 1e-5
on a weight of 0.02 is 2^-11 of it), and Adam's second moment, which moves by (1 - b2) = 1e-3
of itself per step, would stall in bfloat16 too. So a
model with bfloat16 params trains a float32 copy of them (`float32_master`): the optimizer,
moments included, runs on the copy, and the params are the copy rounded to bfloat16 after every
step (mixed precision, arXiv:1710.03740). Float32 params (the routers') get no copy; a float32
model gets no wrapper (its optimizer state is unchanged).
"""
from __future__ import annotations

from typing import Any, NamedTuple

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


def make_optimizer(train, param_dtype: str = 'float32') -> optax.GradientTransformation:
  """Gradient clipping, then `train.optimizer` on `learning_rate_schedule(train)` with weight
  decay on the leaves `decays` picks; for params stored in a lower precision (`param_dtype`, the
  model's), all of it on their float32 master copy (`float32_master`). `check_config` checks the
  names against OPTIMIZERS and SCHEDULES."""
  schedule = learning_rate_schedule(train)
  if train.optimizer == 'adamw':
    optimizer = optax.adamw(schedule, b1=train.b1, b2=train.b2, weight_decay=train.weight_decay,
                            mask=decay_mask)
  else:
    optimizer = optax.adafactor(schedule, weight_decay_rate=train.weight_decay or None,
                                weight_decay_mask=decay_mask)
  optimizer = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), optimizer)
  return optimizer if param_dtype == 'float32' else float32_master(optimizer)


class MasterState(NamedTuple):
  master: Any  # a float32 copy of each param stored in a lower precision; None for float32 ones
  inner: Any   # the wrapped optimizer's state, on the float32 params


def _is_low(param) -> bool:
  return jnp.dtype(param.dtype) != jnp.float32


def _float32_params(params, master):
  """The params as the optimizer sees them: each one's master copy, or itself when float32."""
  return jax.tree.map(lambda m, p: p if m is None else m, master, params,
                      is_leaf=lambda m: m is None)


def float32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` run on a float32 copy of the params stored in lower precision (bfloat16), kept in
  the state (`MasterState`): gradients are cast to float32, the copy takes the update, and the
  update returned moves each param to its new copy rounded to the param's dtype (through
  `optax.apply_updates`, to float32 rounding). Float32 params have no copy and take `inner`'s
  update as it is."""
  def init(params):
    master = jax.tree.map(lambda p: p.astype(jnp.float32) if _is_low(p) else None, params)
    return MasterState(master, inner.init(_float32_params(params, master)))

  def update(grads, state, params=None):
    full = _float32_params(params, state.master)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    updates, inner_state = inner.update(grads, state.inner, full)
    new = optax.apply_updates(full, updates)
    master = jax.tree.map(lambda p, n: n if _is_low(p) else None, params, new)
    moves = jax.tree.map(lambda p, n, u: n - p.astype(jnp.float32) if _is_low(p) else u,
                         params, new, updates)
    return moves, MasterState(master, inner_state)

  return optax.GradientTransformation(init, update)
