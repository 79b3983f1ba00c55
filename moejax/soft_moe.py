"""Soft MoE (Puigcerver et al., arXiv:2308.00951): every slot a softmax-weighted mixture of all the
tokens of a group, no discrete routing, no drops. Encoders only.

Axis legend (DESIGN.md): B batch, L length, G groups, S tokens per group, E experts,
P slots per expert, D model width.
"""
from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.checks import check_soft_moe_layer
from moejax.experts import ExpertWeights, expert_ffn
from moejax.routers import l2_normalize
from moejax.routing import group_tokens


class SoftMoeLayer(nn.Module):
  """Soft MoE (Puigcerver et al., 2023): [B, L, D] -> [B, L, D], no discrete routing, no drops.

  Per group of S tokens, each of the E * P slots (P = slots_per_expert) is a softmax-weighted
  mixture of all the group's real tokens (softmax over tokens), each expert runs on its P slots,
  and each token's output is a softmax-weighted mixture of all slot outputs (softmax over slots).
  Logits [G, S, E * P] = scale * l2norm(x) . l2norm(phi) in float32, phi [D, E * P] learned
  (phi and scale, its router, are float32 params whatever `param_dtype` is).
  Every slot sees every token of the group, later ones included: encoders only (causal=False;
  True raises). Padded tokens enter no slot and get zeros. No aux losses or metrics are sown.

  Attributes:
    num_experts: E >= 1. ffn_dim: F.
    slots_per_expert: P >= 1.
    group_size: S, tokens per group; None: each sequence is a group.
    activation, glu, init_scale, dtype, param_dtype: as in MoeLayer.
    causal: must be False, the default (the field mirrors MoeLayer's, so a decoder that passes
      causal=True to its FFN layers cannot use Soft MoE by mistake).
  """
  num_experts: int
  ffn_dim: int
  slots_per_expert: int = 1
  group_size: int | None = None
  activation: str = 'relu'
  glu: bool = False
  causal: bool = False
  init_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    check_soft_moe_layer(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, padding_mask: jax.Array | None = None,
               token_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, L, D]; padding_mask: [B, L], True for real tokens. `deterministic` and `token_ids`
    are accepted for MoeLayer's signature; Soft MoE has no noise or dropout and ignores ids."""
    del deterministic, token_ids
    tokens, valid = group_tokens(x, padding_mask, self.group_size, type(self).__name__)
    num_groups, model_dim = tokens.shape[0], tokens.shape[-1]
    num_slots = self.num_experts * self.slots_per_expert
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
    phi = self.param('phi', init, (model_dim, num_slots), jnp.float32)  # Shape: [D, E * P]
    scale = self.param('scale', nn.initializers.ones, (), jnp.float32)
    normed = l2_normalize(tokens.astype(jnp.float32), -1)  # Shape: [G, S, D]
    logits = scale * jnp.einsum('gsd,dn->gsn', normed,
                                l2_normalize(phi, 0))  # Shape: [G, S, E * P]
    dispatch = jax.nn.softmax(jnp.where(valid[..., None], logits, -1e9), axis=1)  # over tokens
    combine = jax.nn.softmax(logits, axis=-1)  # Shape: [G, S, E * P], over slots
    slots = jnp.einsum('gsn,gsd->ngd', dispatch.astype(self.dtype), tokens.astype(self.dtype))
    slots = einops.rearrange(slots, '(e p) g d -> e (p g) d', e=self.num_experts)  # [E, P*G, D]
    weights = ExpertWeights(self.num_experts, self.ffn_dim, glu=self.glu,
                            init_scale=self.init_scale, param_dtype=self.param_dtype,
                            name='experts')(model_dim)
    outputs = expert_ffn(slots, weights, activation=self.activation, dtype=self.dtype)
    outputs = einops.rearrange(outputs, 'e (p g) d -> (e p) g d', g=num_groups)  # [E * P, G, D]
    out = jnp.einsum('gsn,ngd->gsd', combine.astype(self.dtype), outputs)  # Shape: [G, S, D]
    return jnp.where(valid[..., None], out, 0).astype(self.dtype).reshape(x.shape)
