"""E feed-forward experts with stacked weights, run as one batched matmul.

Axis legend (DESIGN.md): E experts, G groups, C capacity, N tokens per expert, D model width,
F expert hidden width. Weights follow Flax's (in, out) layout with a leading expert axis:
`wi [E, D, F]` (and `wi_gate [E, D, F]` for GLU), `wo [E, F, D]`; no biases, as in T5 and Switch.
They carry Flax logical axis names ('expert', 'embed', 'mlp'), which `moejax.sharding` maps to the
mesh axes ('expert', None, 'model'); `nn.unbox(variables)` gives plain arrays.
"""
from __future__ import annotations

import functools
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


def _hidden(activation: str, pre: jax.Array, gate_pre: jax.Array | None,
            scale: jax.Array | None) -> jax.Array:
  """Hidden activations from pre-activations: act(x wi) [* x wi_gate] [* dropout scale]."""
  hidden = ACTIVATIONS[activation](pre)
  if gate_pre is not None:
    hidden = hidden * gate_pre
  return hidden if scale is None else hidden * scale


def block_expert_ffn(rows: jax.Array, first_block: jax.Array, block_count: jax.Array,
                     weights: dict[str, jax.Array], *, block_size: int, activation: str,
                     dtype: Any, dropout_rate: float = 0.0,
                     dropout_rng: jax.Array | None = None) -> jax.Array:
  """The E FFNs on rows sorted by expert into blocks: rows [R, D] -> [R, D].

  Expert e owns blocks first_block[e] .. first_block[e] + block_count[e] - 1 ([E] int32 each) of
  `block_size` rows; rows in no expert's blocks get zeros. A scan over the experts (which slices
  the stacked weights without copying them) runs a loop over each expert's blocks, so the FLOPs
  follow the rows dispatched, not a capacity. The backward pass is hand-written the same way:
  each expert's weight gradients are summed over its blocks in float32.
  """
  scale = None
  if dropout_rng is not None and dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                (rows.shape[0], weights['wi'].shape[-1]))
    scale = (keep / (1.0 - dropout_rate)).astype(dtype)  # Shape: [R, F]
  cast = {name: w.astype(dtype) for name, w in weights.items()}
  return _block_ffn(activation, block_size, rows.astype(dtype), first_block, block_count,
                    cast['wi'], cast['wo'], cast.get('wi_gate'), scale)


def _blocks(x: jax.Array | None, block_size: int) -> jax.Array | None:
  """[R, X] -> [R / b, b, X] (None stays None)."""
  return None if x is None else x.reshape(-1, block_size, x.shape[-1])


def _at(x: jax.Array | None, i: jax.Array) -> jax.Array | None:
  return None if x is None else jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _block_ffn(activation, block_size, rows, first_block, block_count, wi, wo, wi_gate, scale):
  return _block_ffn_fwd(activation, block_size, rows, first_block, block_count, wi, wo, wi_gate,
                        scale)[0]


def _block_ffn_fwd(activation, block_size, rows, first_block, block_count, wi, wo, wi_gate,
                   scale):
  x, scale_b = _blocks(rows, block_size), _blocks(scale, block_size)  # Shape: [NB, b, D]

  def expert(carry, per_expert):
    w_in, w_out, w_gate, first, count = per_expert  # Shapes: [D, F], [F, D], [D, F], [], []

    def block(i, carry):
      out, pre, gate_pre = carry
      p = _at(x, i) @ w_in  # Shape: [b, F]
      g = None if w_gate is None else _at(x, i) @ w_gate
      y = _hidden(activation, p, g, _at(scale_b, i)) @ w_out  # Shape: [b, D]
      gate_pre = None if g is None else gate_pre.at[i].set(g)
      return out.at[i].set(y), pre.at[i].set(p), gate_pre
    return jax.lax.fori_loop(first, first + count, block, carry), None

  hidden_shape = (*x.shape[:2], wi.shape[-1])  # Shape: [NB, b, F]
  init = (jnp.zeros_like(x), jnp.zeros(hidden_shape, rows.dtype),
          None if wi_gate is None else jnp.zeros(hidden_shape, rows.dtype))
  (out, pre, gate_pre), _ = jax.lax.scan(expert, init,
                                         (wi, wo, wi_gate, first_block, block_count))
  residuals = (rows, first_block, block_count, wi, wo, wi_gate, scale, pre, gate_pre)
  return out.reshape(rows.shape), residuals


def _block_ffn_bwd(activation, block_size, residuals, grad):
  rows, first_block, block_count, wi, wo, wi_gate, scale, pre, gate_pre = residuals
  x, dy, scale_b = (_blocks(a, block_size) for a in (rows, grad, scale))
  f32 = jnp.float32

  def expert(dx, per_expert):
    w_in, w_out, w_gate, first, count = per_expert

    def block(i, carry):
      dx, dw_in, dw_out, dw_gate = carry
      xi, dyi = _at(x, i), _at(dy, i)  # Shapes: [b, D]
      hidden, hidden_vjp = jax.vjp(
          lambda p, g: _hidden(activation, p, g, _at(scale_b, i)), _at(pre, i), _at(gate_pre, i))
      dw_out = dw_out + jnp.dot(hidden.T, dyi, preferred_element_type=f32)
      d_pre, d_gate_pre = hidden_vjp(dyi @ w_out.T)  # Shapes: [b, F]
      dw_in = dw_in + jnp.dot(xi.T, d_pre, preferred_element_type=f32)
      dxi = d_pre @ w_in.T  # Shape: [b, D]
      if w_gate is not None:
        dw_gate = dw_gate + jnp.dot(xi.T, d_gate_pre, preferred_element_type=f32)
        dxi = dxi + d_gate_pre @ w_gate.T
      return dx.at[i].set(dxi), dw_in, dw_out, dw_gate

    zeros = lambda w: None if w is None else jnp.zeros(w.shape, f32)  # noqa: E731
    dx, dw_in, dw_out, dw_gate = jax.lax.fori_loop(
        first, first + count, block, (dx, zeros(w_in), zeros(w_out), zeros(w_gate)))
    return dx, (dw_in, dw_out, dw_gate)

  dx, (dwi, dwo, dwi_gate) = jax.lax.scan(expert, jnp.zeros_like(x),
                                          (wi, wo, wi_gate, first_block, block_count))
  cast = lambda d, w: None if w is None else d.astype(w.dtype)  # noqa: E731
  return (dx.reshape(rows.shape), None, None, cast(dwi, wi), cast(dwo, wo),
          cast(dwi_gate, wi_gate), None)


_block_ffn.defvjp(_block_ffn_fwd, _block_ffn_bwd)
