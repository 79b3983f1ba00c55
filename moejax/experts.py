"""E feed-forward experts with stacked weights, run as one batched matmul.

Axis legend (DESIGN.md): E experts, G groups, C capacity, N tokens per expert, R rows sorted by
expert, D model width, F expert hidden width. Weights follow Flax's (in, out) layout with a
leading expert axis: `wi [E, D, F]` (and `wi_gate [E, D, F]` for GLU), `wo [E, F, D]`; no
biases, as in T5 and Switch. They are plain arrays; `moejax.sharding` names their axes by
parameter path ('expert', 'embed', 'mlp') and maps those to the mesh axes ('expert', None,
'model').
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {'relu': nn.relu, 'gelu': nn.gelu, 'silu': nn.silu}


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
    ffn_dim: F.
    glu: add `wi_gate` for a gated linear unit (T5.1.1, ST-MoE).
    init_scale: scale of the fan-in truncated-normal init (Switch used 0.1).
    param_dtype: storage dtype.
  """
  num_experts: int
  ffn_dim: int
  glu: bool = False
  init_scale: float = 1.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, model_dim: int) -> dict[str, jax.Array]:
    shapes = {'wi': (self.num_experts, model_dim, self.ffn_dim),
              'wo': (self.num_experts, self.ffn_dim, model_dim)}
    if self.glu:
      shapes['wi_gate'] = shapes['wi']
    init = expert_init(self.init_scale)
    return {name: self.param(name, init, shape, self.param_dtype) for name, shape in shapes.items()}


def _hidden(activation: str, pre: jax.Array, gate_pre: jax.Array | None,
            scale: jax.Array | None) -> jax.Array:
  """Hidden activations from pre-activations: act(x wi) [* x wi_gate] [* dropout scale]."""
  hidden = ACTIVATIONS[activation](pre)
  if gate_pre is not None:
    hidden = hidden * gate_pre
  return hidden if scale is None else hidden * scale


def block_expert_ffn(rows: jax.Array, first_row: jax.Array, row_count: jax.Array,
                     weights: dict[str, jax.Array], *, block_size: int, tile: int,
                     activation: str, dtype: Any, dropout_rate: float = 0.0,
                     dropout_rng: jax.Array | None = None) -> jax.Array:
  """The E FFNs on rows sorted by expert: rows [R, D] -> [R, D].

  Expert e owns rows first_row[e] .. first_row[e] + row_count[e] - 1 ([E] int32 each; row_count
  a multiple of `tile`); rows owned by no expert get zeros. A scan over the experts runs, for
  each, a loop of matmuls on blocks of `block_size` rows, then one block of the rest (a multiple
  of `tile`, so block_size / tile block shapes in all). FLOPs so follow the rows dispatched
  (padded to a tile), not a capacity, and an expert with up to `block_size` rows costs one matmul
  per weight: each extra block re-reads the expert's weights and adds into its gradients.
  The backward pass is hand-written the same way: each block's weight gradients are added, in
  place, to its expert's slice of stacked float32 gradients (no per-expert buffers to copy).
  """
  if block_size % tile:
    raise ValueError(f'block_size={block_size} must be a multiple of tile={tile}')
  scale = _dropout_scale(dropout_rng, dropout_rate, (rows.shape[0], weights['wi'].shape[-1]),
                         dtype)
  cast = {name: w.astype(dtype) for name, w in weights.items()}
  return _block_ffn(activation, block_size, tile, rows.astype(dtype), first_row, row_count,
                    cast['wi'], cast['wo'], cast.get('wi_gate'), scale)


def grouped_expert_ffn(rows: jax.Array, group_sizes: jax.Array, weights: dict[str, jax.Array], *,
                       activation: str, dtype: Any, dropout_rate: float = 0.0,
                       dropout_rng: jax.Array | None = None) -> jax.Array:
  """The E FFNs on rows sorted by expert, as grouped matmuls (`jax.lax.ragged_dot`):
  rows [R, D] -> [R, D].

  Expert e owns the group_sizes[e] rows ([E] int32) that follow those of experts 0 .. e-1; rows
  past sum(group_sizes) get zeros. On GPU and TPU a grouped matmul reads each row with its own
  expert's weights only; XLA:CPU lowers it to a dense product masked by group, E times the
  FLOPs. Its default gradient is grouped matmuls again (`ragged_dot_general`, the weight
  gradients contracting over each group's rows), so it has no hand-written backward pass.
  """
  scale = _dropout_scale(dropout_rng, dropout_rate, (rows.shape[0], weights['wi'].shape[-1]),
                         dtype)
  def grouped(x, name):
    return jax.lax.ragged_dot(x, weights[name].astype(dtype), group_sizes)

  rows = rows.astype(dtype)
  gate_pre = grouped(rows, 'wi_gate') if 'wi_gate' in weights else None  # Shape: [R, F]
  hidden = _hidden(activation, grouped(rows, 'wi'), gate_pre, scale)  # Shape: [R, F]
  return grouped(hidden, 'wo')  # Shape: [R, D]


def _dropout_scale(rng: jax.Array | None, rate: float, shape: tuple[int, ...],
                   dtype: Any) -> jax.Array | None:
  """The dropout factors of hidden activations of `shape` (0 or 1 / (1 - rate)); None when
  there is no dropout."""
  if rng is None or rate <= 0:
    return None
  keep = jax.random.bernoulli(rng, 1.0 - rate, shape)
  return (keep / (1.0 - rate)).astype(dtype)


def _for_each_block(carry, first_row, row_count, block_size, tile, max_rows, run_block):
  """carry = run_block(start, size, carry) over one expert's rows, in blocks of `block_size`,
  then one block of the rest, whose size is one of block_size - tile, ..., tile (sizes above the
  buffer's `max_rows` are skipped: no expert has that many rows)."""
  done = 0
  for size in range(block_size, 0, -tile):
    if size > max_rows:
      continue
    count = (row_count - done) // size  # any number for block_size, then 0 or 1
    offset = first_row + done
    carry = jax.lax.fori_loop(
        0, count, lambda j, c, size=size, offset=offset: run_block(offset + j * size, size, c),
        carry)
    done = done + count * size
  return carry


def _rows_at(x: jax.Array | None, start: jax.Array, size: int) -> jax.Array | None:
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size)


def _set_rows(x: jax.Array | None, update: jax.Array | None, start: jax.Array):
  return None if x is None else jax.lax.dynamic_update_slice_in_dim(x, update, start, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _block_ffn(activation, block_size, tile, rows, first_row, row_count, wi, wo, wi_gate, scale):
  return _block_ffn_fwd(activation, block_size, tile, rows, first_row, row_count, wi, wo,
                        wi_gate, scale)[0]


def _block_ffn_fwd(activation, block_size, tile, rows, first_row, row_count, wi, wo, wi_gate,
                   scale):
  def expert(carry, per_expert):
    w_in, w_out, w_gate, first, count = per_expert  # Shapes: [D, F], [F, D], [D, F], [], []

    def block(start, size, carry):
      out, pre, gate_pre = carry
      x = _rows_at(rows, start, size)  # Shape: [size, D]
      p = x @ w_in  # Shape: [size, F]
      g = None if w_gate is None else x @ w_gate
      y = _hidden(activation, p, g, _rows_at(scale, start, size)) @ w_out  # Shape: [size, D]
      return _set_rows(out, y, start), _set_rows(pre, p, start), _set_rows(gate_pre, g, start)
    return _for_each_block(carry, first, count, block_size, tile, rows.shape[0], block), None

  hidden_shape = (rows.shape[0], wi.shape[-1])  # Shape: [R, F]
  init = (jnp.zeros_like(rows), jnp.zeros(hidden_shape, rows.dtype),
          None if wi_gate is None else jnp.zeros(hidden_shape, rows.dtype))
  (out, pre, gate_pre), _ = jax.lax.scan(expert, init, (wi, wo, wi_gate, first_row, row_count))
  residuals = (rows, first_row, row_count, wi, wo, wi_gate, scale, pre, gate_pre)
  return out, residuals


def _block_ffn_bwd(activation, block_size, tile, residuals, grad):
  rows, first_row, row_count, wi, wo, wi_gate, scale, pre, gate_pre = residuals
  f32 = jnp.float32

  def expert(e, carry):
    w_in, w_out = wi[e], wo[e]  # Shapes: [D, F], [F, D]
    w_gate = None if wi_gate is None else wi_gate[e]

    def block(start, size, carry):
      dx, dw_in, dw_out, dw_gate = carry  # Shapes: [R, D], [E, D, F], [E, F, D], [E, D, F]
      x, dy = _rows_at(rows, start, size), _rows_at(grad, start, size)  # Shapes: [size, D]
      hidden, hidden_vjp = jax.vjp(
          lambda p, g: _hidden(activation, p, g, _rows_at(scale, start, size)),
          _rows_at(pre, start, size), _rows_at(gate_pre, start, size))
      dw_out = dw_out.at[e].add(jnp.dot(hidden.T, dy, preferred_element_type=f32))
      d_pre, d_gate_pre = hidden_vjp(dy @ w_out.T)  # Shapes: [size, F]
      dw_in = dw_in.at[e].add(jnp.dot(x.T, d_pre, preferred_element_type=f32))
      dx_rows = d_pre @ w_in.T  # Shape: [size, D]
      if w_gate is not None:
        dw_gate = dw_gate.at[e].add(jnp.dot(x.T, d_gate_pre, preferred_element_type=f32))
        dx_rows = dx_rows + d_gate_pre @ w_gate.T
      return _set_rows(dx, dx_rows, start), dw_in, dw_out, dw_gate
    return _for_each_block(carry, first_row[e], row_count[e], block_size, tile, rows.shape[0],
                           block)

  # Each expert's weight gradients accumulate in place in the stacked float32 buffers.
  zeros = lambda w: None if w is None else jnp.zeros(w.shape, f32)  # noqa: E731
  dx, dwi, dwo, dwi_gate = jax.lax.fori_loop(
      0, wi.shape[0], expert, (jnp.zeros_like(rows), zeros(wi), zeros(wo), zeros(wi_gate)))
  cast = lambda d, w: None if w is None else d.astype(w.dtype)  # noqa: E731
  return dx, None, None, cast(dwi, wi), cast(dwo, wo), cast(dwi_gate, wi_gate), None


_block_ffn.defvjp(_block_ffn_fwd, _block_ffn_bwd)
