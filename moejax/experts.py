"""E feed-forward experts with stacked weights, run as one batched matmul.

Axis legend (DESIGN.md): E experts, G groups, C capacity, N tokens per expert, R rows sorted by
expert, D model width, F expert hidden width. Weights follow Flax's (in, out) layout with a
leading expert axis: `wi [E, D, F]` (and `wi_gate [E, D, F]` for GLU), `wo [E, F, D]`; no
biases, as in T5 and Switch, unless asked for (gpt-oss): `bi [E, F]` (and `bi_gate [E, F]`),
`bo [E, D]`. They are plain arrays; `moejax.sharding` names their axes by parameter path
('expert', 'embed', 'mlp') and maps those to the mesh axes ('expert', None, 'model').

The hidden units are `Activation`'s: act(x wi + bi) [* (x wi_gate + bi_gate)], with gpt-oss's
clamps and offset as options.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {'relu': nn.relu, 'gelu': nn.gelu, 'silu': nn.silu,
               # x sigmoid(1.702 x), GELU's sigmoid approximation (CLIP's QuickGELU; gpt-oss's
               # alpha = 1.702)
               'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x)}


@dataclasses.dataclass(frozen=True)
class Activation:
  """An expert's hidden units from its pre-activations p = x wi (+ bi) and, for GLU,
  g = x wi_gate (+ bi_gate): act(min(p, limit)) * (clip(g, -limit, limit) + glu_offset).

  name: a key of ACTIVATIONS. limit: None clamps nothing. glu_offset: added to the linear half
  of a GLU. gpt-oss's clamped SwiGLU is Activation('quick_gelu', limit=7.0, glu_offset=1.0):
  (up + 1) * gate * sigmoid(1.702 gate), gate clamped above at 7, up to [-7, 7].
  """
  name: str = 'relu'
  limit: float | None = None
  glu_offset: float = 0.0

  def __call__(self, pre: jax.Array, gate_pre: jax.Array | None) -> jax.Array:
    if self.limit is not None:
      pre = jnp.minimum(pre, self.limit)
    hidden = ACTIVATIONS[self.name](pre)
    if gate_pre is None:
      return hidden
    if self.limit is not None:
      gate_pre = jnp.clip(gate_pre, -self.limit, self.limit)
    return hidden * (gate_pre + self.glu_offset)


def bias_name(weight: str) -> str:
  """The expert bias added after a weight: 'wi' -> 'bi', 'wi_gate' -> 'bi_gate', 'wo' -> 'bo'."""
  return 'b' + weight[1:]


def as_activation(activation: str | Activation) -> Activation:
  """An Activation, from itself or from an ACTIVATIONS name (no clamp, no offset)."""
  return activation if isinstance(activation, Activation) else Activation(activation)


def expert_init(scale: float) -> nn.initializers.Initializer:
  """Truncated-normal fan-in init drawn independently for each expert (axis 0 is a batch axis)."""
  return nn.initializers.variance_scaling(scale, 'fan_in', 'truncated_normal', in_axis=-2,
                                          out_axis=-1, batch_axis=(0,))


def expert_ffn(x: jax.Array, weights: dict[str, jax.Array], *, activation: str | Activation,
               dtype: Any, dropout_rate: float = 0.0,
               dropout_rng: jax.Array | None = None) -> jax.Array:
  """The E FFNs on their tokens: x [E, N, D] -> [E, N, D].

  weights: 'wi' [E, D, F], 'wo' [E, F, D] and, for GLU, 'wi_gate' [E, D, F]; with expert biases
  'bi' [E, F], 'bo' [E, D] (and 'bi_gate' [E, F]). With F sharded (model parallelism) the
  result is this shard's partial sum (so 'bo' must be given on one shard only). Dropout on the
  hidden activations when `dropout_rng` is given.
  """
  x = x.astype(dtype)
  def project(h, name, spec):
    out = jnp.einsum(spec, h, weights[name].astype(dtype))
    bias = weights.get(bias_name(name))  # Shape: [E, F] or [E, D], or None
    return out if bias is None else out + bias.astype(dtype)[:, None, :]

  gate_pre = project(x, 'wi_gate', 'end,edf->enf') if 'wi_gate' in weights else None
  hidden = as_activation(activation)(project(x, 'wi', 'end,edf->enf'), gate_pre)
  # Shape: [E, N, F]
  if dropout_rng is not None and dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, hidden.shape)
    hidden = jnp.where(keep, hidden / (1.0 - dropout_rate), 0).astype(dtype)
  return project(hidden, 'wo', 'enf,efd->end')  # Shape: [E, N, D]


class ExpertWeights(nn.Module):
  """Declares the stacked expert weights; returns {'wi', 'wo'[, 'wi_gate']} (with `bias` also
  {'bi', 'bo'[, 'bi_gate']}) for `expert_ffn`.

  The layer runs `expert_ffn` itself, on one device or per device inside `jax.shard_map`, so the
  weights are made here and passed in as arrays.

  Attributes:
    num_experts: E.
    ffn_dim: F.
    glu: add `wi_gate` for a gated linear unit (T5.1.1, ST-MoE).
    bias: add zero-initialized biases 'bi' [E, F] (and 'bi_gate' [E, F]) and 'bo' [E, D]
      (gpt-oss).
    init_scale: scale of the fan-in truncated-normal init (Switch used 0.1).
    param_dtype: storage dtype.
  """
  num_experts: int
  ffn_dim: int
  glu: bool = False
  bias: bool = False
  init_scale: float = 1.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, model_dim: int) -> dict[str, jax.Array]:
    shapes = {'wi': (self.num_experts, model_dim, self.ffn_dim),
              'wo': (self.num_experts, self.ffn_dim, model_dim)}
    if self.glu:
      shapes['wi_gate'] = shapes['wi']
    init = expert_init(self.init_scale)
    weights = {name: self.param(name, init, shape, self.param_dtype)
               for name, shape in shapes.items()}
    if self.bias:  # Shapes: 'bi' [E, F], 'bi_gate' [E, F], 'bo' [E, D]
      weights.update({bias_name(name): self.param(bias_name(name), nn.initializers.zeros,
                                                  (self.num_experts, shape[-1]),
                                                  self.param_dtype)
                      for name, shape in shapes.items()})
    return weights


def _hidden(activation: Activation, pre: jax.Array, gate_pre: jax.Array | None,
            scale: jax.Array | None) -> jax.Array:
  """Hidden activations from pre-activations: activation(pre, gate_pre) [* dropout scale]."""
  hidden = activation(pre, gate_pre)
  return hidden if scale is None else hidden * scale


def _plus(x: jax.Array, bias: jax.Array | None) -> jax.Array:
  """x [N, width] + bias [width] (or [N, width]); x alone when there is no bias."""
  return x if bias is None else x + bias


def block_expert_ffn(rows: jax.Array, first_row: jax.Array, row_count: jax.Array,
                     weights: dict[str, jax.Array], *, block_size: int, tile: int,
                     activation: str | Activation, dtype: Any, dropout_rate: float = 0.0,
                     dropout_rng: jax.Array | None = None,
                     max_expert_rows: int | None = None) -> jax.Array:
  """The E FFNs on rows sorted by expert: rows [R, D] -> [R, D].

  Expert e owns rows first_row[e] .. first_row[e] + row_count[e] - 1 ([E] int32 each; row_count
  a multiple of `tile`); rows owned by no expert get zeros. A scan over the experts runs, for
  each, a loop of matmuls on blocks of `block_size` rows, then one block of the rest (a multiple
  of `tile`, so block_size / tile block shapes in all). FLOPs so follow the rows dispatched
  (padded to a tile), not a capacity, and an expert with up to `block_size` rows costs one matmul
  per weight: each extra block re-reads the expert's weights and adds into its gradients.
  The backward pass is hand-written the same way: each block's weight gradients are added, in
  place, to its expert's slice of stacked float32 gradients (no per-expert buffers to copy).
  Expert biases ('bi', 'bi_gate', 'bo': see `expert_ffn`) are added to an expert's rows; the
  padding rows of its tiles get them too, and the combine reads no padding row.
  max_expert_rows: the most rows one expert can own (None: all of them); with a capacity,
  G * C rounded up to a tile. Block shapes above it are not compiled.
  """
  if block_size % tile:
    raise ValueError(f'block_size={block_size} must be a multiple of tile={tile}')
  scale = _dropout_scale(dropout_rng, dropout_rate, (rows.shape[0], weights['wi'].shape[-1]),
                         dtype)
  cast = {name: w.astype(dtype) for name, w in weights.items()}
  params = tuple(cast.get(name) for name in BLOCK_PARAMS)
  max_rows = min(rows.shape[0], max_expert_rows or rows.shape[0])
  return _block_ffn(as_activation(activation), block_size, tile, max_rows, rows.astype(dtype),
                    first_row, row_count, params, scale)


def grouped_expert_ffn(rows: jax.Array, group_sizes: jax.Array, weights: dict[str, jax.Array], *,
                       activation: str | Activation, dtype: Any, dropout_rate: float = 0.0,
                       dropout_rng: jax.Array | None = None) -> jax.Array:
  """The E FFNs on rows sorted by expert, as grouped matmuls (`jax.lax.ragged_dot`):
  rows [R, D] -> [R, D].

  Expert e owns the group_sizes[e] rows ([E] int32) that follow those of experts 0 .. e-1; rows
  past sum(group_sizes) get zeros. On GPU and TPU a grouped matmul reads each row with its own
  expert's weights only; XLA:CPU lowers it to a dense product masked by group, E times the
  FLOPs. Its default gradient is grouped matmuls again (`ragged_dot_general`, the weight
  gradients contracting over each group's rows), so it has no hand-written backward pass.
  Expert biases ('bi', 'bi_gate', 'bo': see `expert_ffn`) are added to each row by its expert;
  rows past sum(group_sizes) get none.
  """
  scale = _dropout_scale(dropout_rng, dropout_rate, (rows.shape[0], weights['wi'].shape[-1]),
                         dtype)
  row_expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows.shape[0]),
                                side='right')  # Shape: [R], E past the last group
  def grouped(x, name):
    out = jax.lax.ragged_dot(x, weights[name].astype(dtype), group_sizes)
    bias = weights.get(bias_name(name))  # Shape: [E, F] or [E, D], or None
    return _plus(out, None if bias is None else jnp.take(
        bias.astype(dtype), row_expert, axis=0, mode='fill', fill_value=0))

  rows = rows.astype(dtype)
  gate_pre = grouped(rows, 'wi_gate') if 'wi_gate' in weights else None  # Shape: [R, F]
  hidden = _hidden(as_activation(activation), grouped(rows, 'wi'), gate_pre, scale)
  # Shape: [R, F]
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
  then one block of the rest, whose size is one of block_size - tile, ..., tile (sizes above
  `max_rows` are skipped: no expert has that many rows)."""
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


# The stacked expert params `_block_ffn` takes, in this order (absent ones None).
BLOCK_PARAMS = ('wi', 'wo', 'wi_gate', 'bi', 'bo', 'bi_gate')


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _block_ffn(activation, block_size, tile, max_rows, rows, first_row, row_count, params, scale):
  return _block_ffn_fwd(activation, block_size, tile, max_rows, rows, first_row, row_count,
                        params, scale)[0]


def _block_ffn_fwd(activation, block_size, tile, max_rows, rows, first_row, row_count, params,
                   scale):
  def expert(carry, per_expert):
    (w_in, w_out, w_gate, b_in, b_out, b_gate), first, count = per_expert
    # Shapes: [D, F], [F, D], [D, F], [F], [D], [F], [], []

    def block(start, size, carry):
      out, pre, gate_pre = carry
      x = _rows_at(rows, start, size)  # Shape: [size, D]
      p = _plus(x @ w_in, b_in)  # Shape: [size, F]
      g = None if w_gate is None else _plus(x @ w_gate, b_gate)
      y = _plus(_hidden(activation, p, g, _rows_at(scale, start, size)) @ w_out, b_out)
      # Shape: [size, D]
      return _set_rows(out, y, start), _set_rows(pre, p, start), _set_rows(gate_pre, g, start)
    return _for_each_block(carry, first, count, block_size, tile, max_rows, block), None

  wi, wi_gate = params[0], params[2]
  hidden_shape = (rows.shape[0], wi.shape[-1])  # Shape: [R, F]
  init = (jnp.zeros_like(rows), jnp.zeros(hidden_shape, rows.dtype),
          None if wi_gate is None else jnp.zeros(hidden_shape, rows.dtype))
  (out, pre, gate_pre), _ = jax.lax.scan(expert, init, (params, first_row, row_count))
  residuals = (rows, first_row, row_count, params, scale, pre, gate_pre)
  return out, residuals


def _block_ffn_bwd(activation, block_size, tile, max_rows, residuals, grad):
  rows, first_row, row_count, params, scale, pre, gate_pre = residuals
  wi, wo, wi_gate = params[:3]
  f32 = jnp.float32

  def expert(e, carry):
    w_in, w_out = wi[e], wo[e]  # Shapes: [D, F], [F, D]
    w_gate = None if wi_gate is None else wi_gate[e]

    def block(start, size, carry):
      dx, (dw_in, dw_out, dw_gate, db_in, db_out, db_gate) = carry
      # Shapes: [R, D]; [E, D, F], [E, F, D], [E, D, F], [E, F], [E, D], [E, F]
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
      if db_in is not None:  # expert biases: the sums of their rows' gradients
        db_in = db_in.at[e].add(jnp.sum(d_pre, axis=0, dtype=f32))
        db_out = db_out.at[e].add(jnp.sum(dy, axis=0, dtype=f32))
      if db_gate is not None:
        db_gate = db_gate.at[e].add(jnp.sum(d_gate_pre, axis=0, dtype=f32))
      grads = (dw_in, dw_out, dw_gate, db_in, db_out, db_gate)
      return _set_rows(dx, dx_rows, start), grads
    return _for_each_block(carry, first_row[e], row_count[e], block_size, tile, max_rows,
                           block)

  # Each expert's param gradients accumulate in place in stacked float32 buffers.
  zeros = lambda w: None if w is None else jnp.zeros(w.shape, f32)  # noqa: E731
  dx, dparams = jax.lax.fori_loop(
      0, wi.shape[0], expert, (jnp.zeros_like(rows), tuple(zeros(w) for w in params)))
  cast = lambda d, w: None if w is None else d.astype(w.dtype)  # noqa: E731
  return dx, None, None, tuple(cast(d, w) for d, w in zip(dparams, params)), None


_block_ffn.defvjp(_block_ffn_fwd, _block_ffn_bwd)
