"""E feed-forward experts with stacked weights, run as one batched matmul.

Axis legend (DESIGN.md): E experts, G groups, C capacity, N tokens per expert, D model width,
F expert hidden width. Weights follow Flax's (in, out) layout with a leading expert axis:
`wi [E, D, F]` (and `wi_gate [E, D, F]` for GLU), `wo [E, F, D]`; no biases, as in T5 and Switch.
They carry Flax logical axis names ('expert', 'embed', 'mlp'), which `moejax.sharding` maps to the
mesh axes ('expert', None, 'model'); `nn.unbox(variables)` gives plain arrays.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {'relu': nn.relu, 'gelu': nn.gelu, 'silu': nn.silu}
LOGICAL_AXES = {'wi': ('expert', 'embed', 'mlp'), 'wi_gate': ('expert', 'embed', 'mlp'),
                'wo': ('expert', 'mlp', 'embed')}


def expert_init(scale: float) -> nn.initializers.Initializer:
  """Truncated-normal fan-in init drawn independently for each expert (axis 0 is a batch axis)."""
  return nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal', in_axis=-2,
                                          out_axis=-1, batch_axis=(0,))


def expert_ffn(x: jax.Array, weights: dict[str, jax.Array], *, activation: str, dtype: Any,
               dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """The E FFNs on their tokens: x [E, N, D] -> [E, N, D].

  weights: 'wi' [E, D, F], 'wo' [E, F, D] and, for GLU, 'wi_gate' [E, D, F]. With F sharded
  (model parallelism) the result is this shard's partial sum. Dropout on the hidden activations
  when `dropout_rng` is given.
  """
  x = x.astype(dtype)
  hidden = ACTIVATIONS[activation](
      jnp.einsum('end,edf->enf', x, weights['wi'].astype(dtype)))  # Shape: [E, N, F]
  if 'wi_gate' in weights:
    hidden = hidden * jnp.einsum('end,edf->enf', x, weights['wi_gate'].astype(dtype))
  if dropout_rng is not None and dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, hidden.shape)
    hidden = jnp.where(keep, hidden / (1.0 - dropout_rate), 0).astype(dtype)
  return jnp.einsum('enf,efd->end', hidden, weights['wo'].astype(dtype))  # Shape: [E, N, D]


class ExpertWeights(nn.Module):
  """Declares the stacked expert weights; returns {'wi', 'wo'[, 'wi_gate']} for `expert_ffn`.

  The layer runs `expert_ffn` itself, on one device or per device inside `jax.shard_map`, so the
  weights are made here and passed in as arrays.

  Attributes:
    num_experts: E.
    hidden_dim: F.
    glu: add `wi_gate` for a gated linear unit (T5.1.1, ST-MoE).
    init_scale: scale of the fan-in truncated-normal init (Switch used 0.1).
    param_dtype: storage dtype.
  """
  num_experts: int
  hidden_dim: int
  glu: bool = False
  init_scale: float = 1.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, model_dim: int) -> dict[str, jax.Array]:
    shapes = {'wi': (self.num_experts, model_dim, self.hidden_dim),
              'wo': (self.num_experts, self.hidden_dim, model_dim)}
    if self.glu:
      shapes['wi_gate'] = shapes['wi']
    init = expert_init(self.init_scale)
    return {name: self.param(name, nn.with_logical_partitioning(init, LOGICAL_AXES[name]), shape,
                             self.param_dtype)
            for name, shape in shapes.items()}
