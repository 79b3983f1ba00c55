"""E feed-forward experts with stacked weights, run as one batched matmul.

Axis legend (DESIGN.md): E experts, N tokens per expert (G * C after dispatch), D model width,
F expert hidden width. Weights follow Flax's (in, out) layout with a leading expert axis:
`wi [E, D, F]` (and `wi_gate [E, D, F]` for GLU), `wo [E, F, D]`; no biases, as in T5 and Switch.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {'relu': nn.relu, 'gelu': nn.gelu, 'silu': nn.silu}


def expert_init(scale: float) -> nn.initializers.Initializer:
  """Truncated-normal fan-in init drawn independently for each expert (axis 0 is a batch axis)."""
  return nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal', in_axis=-2,
                                          out_axis=-1, batch_axis=(0,))


class Experts(nn.Module):
  """E independent FFNs: [E, N, D] -> [E, N, D].

  Attributes:
    num_experts: E.
    hidden_dim: F.
    activation: 'relu', 'gelu' or 'silu'.
    glu: gated linear unit, activation(x wi) * (x wi_gate) (T5.1.1, ST-MoE).
    dropout_rate: dropout on the hidden activations (rng stream `dropout`), Switch's expert dropout.
    init_scale: scale of the fan-in truncated-normal init (Switch used 0.1).
    dtype: compute dtype; param_dtype: storage dtype of the weights.
  """
  num_experts: int
  hidden_dim: int
  activation: str = 'relu'
  glu: bool = False
  dropout_rate: float = 0.0
  init_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    num_experts, _, model_dim = x.shape
    init = expert_init(self.init_scale)
    wi = self.param('wi', init, (num_experts, model_dim, self.hidden_dim), self.param_dtype)
    wo = self.param('wo', init, (num_experts, self.hidden_dim, model_dim), self.param_dtype)
    x = x.astype(self.dtype)
    hidden = ACTIVATIONS[self.activation](
        jnp.einsum('end,edf->enf', x, wi.astype(self.dtype)))  # Shape: [E, N, F]
    if self.glu:
      wi_gate = self.param('wi_gate', init, (num_experts, model_dim, self.hidden_dim),
                           self.param_dtype)
      hidden = hidden * jnp.einsum('end,edf->enf', x, wi_gate.astype(self.dtype))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    return jnp.einsum('enf,efd->end', hidden, wo.astype(self.dtype))  # Shape: [E, N, D]
