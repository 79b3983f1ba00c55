"""MoeLayer for Flax NNX: the linen layer's fields and numbers, as an `nnx.Module`.

  from flax import nnx
  import moejax.nnx

  layer = moejax.nnx.MoeLayer(64, num_experts=8, ffn_dim=256, rngs=nnx.Rngs(0))
  y = layer(x, deterministic=False)                     # x, y: [B, L, 64]
  aux = moejax.collect_aux_losses(nnx.pop(layer, nnx.Intermediate))

The layer is the linen `moejax.MoeLayer` run through `nnx.bridge.ToNNX`, initialized eagerly from
the model width, so its parameters are `nnx.Param`s like any NNX module's (`nnx.Optimizer`,
`nnx.jit`, `nnx.grad` see them) and its outputs are the linen layer's, bit for bit. What the layer
sows (aux losses, routing metrics) lands in `nnx.Intermediate` variables: pop them after each
call (they accumulate otherwise). Training-time noise draws from the `nnx.Rngs` streams named as
in linen: 'dropout' (expert dropout), 'jitter' (router noise), 'gating' (random routing, Gumbel).
With `balancing_bias=True`, training calls record the expert load and
`layer.update_balancing_bias(rate)` moves the bias (DeepSeek-V3), outside the gradient.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import layer as linen_layer
from moejax.balancing import BIAS_COLLECTION, balancing_bias_update


class MoeLayer(nnx.Module):
  """NNX MoE layer [B, L, D] -> [B, L, D].

  Args:
    model_dim: D, the width of the tokens it will take.
    rngs: the params stream initializes it; 'dropout', 'jitter', 'gating' (when the fields use
      them) feed training-mode calls.
    **fields: `moejax.MoeLayer`'s fields (num_experts, ffn_dim, num_selected_experts,
      routing, capacity factors, dispatch, router, ...), with the same defaults and checks.
  """

  def __init__(self, model_dim: int, *, rngs: nnx.Rngs, **fields: Any):
    self.moe = nnx.bridge.ToNNX(linen_layer.MoeLayer(**fields), rngs=rngs)
    length = self.linen.group_size or 1
    x = jnp.zeros((1, length, model_dim), jnp.float32)
    token_ids = jnp.zeros((1, length), jnp.int32) if self.linen.router == 'hash' else None
    nnx.bridge.lazy_init(self.moe, x, True, token_ids=token_ids)

  @property
  def linen(self) -> linen_layer.MoeLayer:
    """The linen layer this one runs (its fields)."""
    return self.moe.to_nnx__module

  def update_balancing_bias(self, rate: float):
    """With `balancing_bias`: bias += rate * sign(mean load - load), from the expert load the last
    training call recorded (`moejax.balancing`)."""
    if not self.linen.balancing_bias:
      raise ValueError('update_balancing_bias needs MoeLayer(balancing_bias=True)')
    bias, load = self.moe.bias.get_value(), self.moe.load.get_value()
    self.moe.bias.set_value(balancing_bias_update(bias, load, rate))

  def __call__(self, x: jax.Array, deterministic: bool, padding_mask: jax.Array | None = None,
               token_ids: jax.Array | None = None) -> jax.Array:
    """As `moejax.MoeLayer.__call__`; sown values become `nnx.Intermediate` variables (and, with
    balancing_bias in training, the recorded expert load updates the layer's bias state)."""
    mutable = ['intermediates']
    if self.linen.balancing_bias and not deterministic:
      mutable.append(BIAS_COLLECTION)
    return self.moe(x, deterministic, padding_mask=padding_mask, token_ids=token_ids,
                    mutable=mutable)
