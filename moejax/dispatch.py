"""RoutingDecision -> tokens in expert buffers, and expert outputs back to tokens.

Axis legend (DESIGN.md): G groups, S tokens per group, E experts, K choices per token, C capacity,
D model width. Expert buffers are [E, G, C, D]: slot c of expert e in group g holds one token or
zeros. Every dispatcher has `dispatch(tokens [G,S,D]) -> [E,G,C,D]` and
`combine(outputs [E,G,C,D]) -> [G,S,D]`, and all of them give the same numbers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moejax.routing import RoutingDecision

DISPATCH_METHODS = ('einsum', 'indices')


@struct.dataclass
class EinsumDispatcher:
  """GShard's method: one-hot dispatch and combine tensors, both [G, S, E, C], used in einsums.

  Simple and MXU-friendly on TPUs; costs O(G * S * E * C) memory and FLOPs.
  """
  dispatch_mask: jax.Array  # Shape: [G, S, E, C], 1 where token s fills slot c of expert e
  combine_weights: jax.Array  # Shape: [G, S, E, C], the same positions holding the weights

  @classmethod
  def from_decision(cls, decision: RoutingDecision, dtype) -> 'EinsumDispatcher':
    expert_onehot = jax.nn.one_hot(decision.expert_index, decision.num_experts, dtype=dtype)
    # Shape: [G, S, K, E]
    slot_onehot = jax.nn.one_hot(decision.position, decision.capacity, dtype=dtype)
    slot_onehot = slot_onehot * decision.dispatched[..., None].astype(dtype)  # Shape: [G, S, K, C]
    dispatch_mask = jnp.einsum('gske,gskc->gsec', expert_onehot, slot_onehot)
    combine_weights = jnp.einsum('gske,gskc,gsk->gsec', expert_onehot, slot_onehot,
                                 decision.weight.astype(dtype))
    return cls(dispatch_mask=dispatch_mask, combine_weights=combine_weights)

  def dispatch(self, tokens: jax.Array) -> jax.Array:
    return jnp.einsum('gsec,gsd->egcd', self.dispatch_mask, tokens)

  def combine(self, outputs: jax.Array) -> jax.Array:
    return jnp.einsum('gsec,egcd->gsd', self.combine_weights, outputs)


@struct.dataclass
class IndicesDispatcher:
  """Scatter tokens into buffer slots and gather them back; never builds a [G, S, E, C] tensor.

  Memory O(G * S * K) for the indices; dropped choices point one past the last slot and are
  ignored by the scatter (mode='drop') and zeroed in the combine.
  """
  expert_index: jax.Array  # Shape: [G, S, K] int32
  slot: jax.Array  # Shape: [G, S, K] int32, == C where the choice is not dispatched
  weight: jax.Array  # Shape: [G, S, K] compute dtype, 0 where not dispatched
  capacity: int = struct.field(pytree_node=False)
  num_experts: int = struct.field(pytree_node=False)

  @classmethod
  def from_decision(cls, decision: RoutingDecision, dtype) -> 'IndicesDispatcher':
    slot = jnp.where(decision.dispatched, decision.position, decision.capacity)
    return cls(expert_index=decision.expert_index, slot=slot, weight=decision.weight.astype(dtype),
               capacity=decision.capacity, num_experts=decision.num_experts)

  def _group_index(self) -> jax.Array:
    return jnp.arange(self.slot.shape[0])[:, None, None]  # Shape: [G, 1, 1]

  def dispatch(self, tokens: jax.Array) -> jax.Array:
    num_groups, _, model_dim = tokens.shape
    updates = jnp.broadcast_to(tokens[:, :, None, :], (*self.slot.shape, model_dim))
    # Shape: [G, S, K, D]
    buffers = jnp.zeros((self.num_experts, num_groups, self.capacity, model_dim), tokens.dtype)
    return buffers.at[self.expert_index, self._group_index(), self.slot].add(updates, mode='drop')

  def combine(self, outputs: jax.Array) -> jax.Array:
    gathered = outputs.at[self.expert_index, self._group_index(), self.slot].get(
        mode='fill', fill_value=0)  # Shape: [G, S, K, D]
    return jnp.einsum('gskd,gsk->gsd', gathered, self.weight)


def make_dispatcher(decision: RoutingDecision, method: str, dtype):
  """The dispatcher named `method` ('einsum' or 'indices') for `decision`, in compute `dtype`."""
  if method == 'einsum':
    return EinsumDispatcher.from_decision(decision, dtype)
  if method == 'indices':
    return IndicesDispatcher.from_decision(decision, dtype)
  raise ValueError(f'dispatch={method!r} is not one of {DISPATCH_METHODS}')
