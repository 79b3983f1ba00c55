"""DeepSeek-V3's auxiliary-loss-free load balancing (arXiv:2412.19437, section 2.1.2).

Each MoeLayer(balancing_bias=True) keeps a per-expert bias in the non-trainable
'balancing_bias_state' collection: {'bias': [E], 'load': [E]} ([layers, E] under nn.scan). The bias
is added to the router probabilities to *pick* experts (not to weight them); the layer records the
expert load of each training call in 'load'; between steps, outside the gradient, the bias moves
against the load:

  out, state = model.apply({'params': params, 'balancing_bias_state': bias_state}, x, False,
                           mutable=['intermediates', 'balancing_bias_state'])
  bias_state = update_balancing_biases(state['balancing_bias_state'], rate=1e-3)

(`moejax.train`'s step does this when `model.balancing_bias_rate > 0`.)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

BIAS_COLLECTION = 'balancing_bias_state'


def balancing_bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """bias_e + rate * sign(mean_e' load - load_e): under-used experts gain score, over-used ones
  lose it. bias, load: [..., E] (load: each expert's share of the token choices, or counts)."""
  return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def update_balancing_biases(bias_state: Any, rate: float) -> Any:
  """The 'balancing_bias_state' collection after one bias update of every layer in it. Pure."""
  if not isinstance(bias_state, Mapping):
    return bias_state
  if 'bias' in bias_state and 'load' in bias_state:
    return {**bias_state, 'bias': balancing_bias_update(bias_state['bias'], bias_state['load'],
                                                        rate)}
  return {name: update_balancing_biases(value, rate) for name, value in bias_state.items()}
