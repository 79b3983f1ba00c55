"""RoutingDecision -> tokens in expert buffers, and expert outputs back to tokens.

Axis legend (DESIGN.md): G groups, S tokens per group, E experts, K choices per token, C capacity,
D model width, N = G * S * K token choices, R rows of a row buffer.

Four dispatchers, all giving the same numbers:
- `EinsumDispatcher` (GShard): one-hot [G, S, E, C] dispatch and combine tensors in einsums.
- `IndicesDispatcher`: the same [E, G, C, D] buffers filled and read by gathers.
- `SortedDispatcher`: only the dispatched choices, sorted by expert (each expert's rows padded to
  a small tile); the experts run on them block by block (`experts.block_expert_ffn`), so empty
  capacity slots cost nothing.
- `GroupedDispatcher`: the same sorted rows with exact group sizes (no padding between experts),
  for grouped matmuls (`experts.grouped_expert_ffn`) and the ragged exchange between devices
  (`moejax.exchange`).
They come in two kinds, each with a written contract (a `typing.Protocol`):
- `BufferDispatcher` (einsum, indices): `dispatch(tokens [G, S, D]) -> [E, G, C, D]` and
  `combine([E, G, C, D]) -> [G, S, D]`. Buffers of a fixed shape, one per expert and group: what
  the expert-parallel all-to-all exchanges between devices.
- `RowDispatcher` (sorted, grouped): `dispatch_rows(tokens [G, S, D]) -> [R, D]` and
  `combine_rows([R, D]) -> [G, S, D]`, with each expert's rows at `first_row[e]`, `row_count[e]`.
  Rows whose number follows the tokens dispatched, not a capacity: sorted rows stay on their
  device; grouped rows travel to their experts' devices in a ragged exchange.
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from moejax.routing import RoutingDecision

DISPATCH_METHODS = ('auto', 'einsum', 'indices', 'sorted', 'grouped')


@runtime_checkable
class BufferDispatcher(Protocol):
  """Tokens to per-expert capacity buffers and back (exchangeable between devices)."""

  def dispatch(self, tokens: jax.Array) -> jax.Array:
    """tokens [G, S, D] -> buffers [E, G, C, D]; empty slots are zeros."""

  def combine(self, outputs: jax.Array) -> jax.Array:
    """expert outputs [E, G, C, D] -> [G, S, D], each token the weighted sum of its choices."""


@runtime_checkable
class RowDispatcher(Protocol):
  """Tokens to rows sorted by expert and back (local to a device)."""
  first_row: jax.Array  # Shape: [E], int32
  row_count: jax.Array  # Shape: [E], int32, a multiple of `tile`
  tile: int
  max_group: int  # the most rows one expert can own

  def dispatch_rows(self, tokens: jax.Array) -> jax.Array:
    """tokens [G, S, D] -> rows [R, D]; rows of no expert are zeros."""

  def combine_rows(self, rows: jax.Array) -> jax.Array:
    """expert outputs [R, D] -> [G, S, D], each token the weighted sum of its choices."""


@jax.custom_vjp
def gather_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """out[m] = x[index[m]], zeros where index[m] == len(x); x: [N, D], index: [M] -> [M, D].

  `index` must name each row of x at most once, and inverse[n] be the m with index[m] == n
  (M where there is none). The gradient is then the gather by `inverse`: no scatter-add, which is
  slow on CPUs and GPUs, in the forward or the backward pass.
  """
  return jnp.take(x, index, axis=0, mode='fill', fill_value=0)


def _gather_rows_fwd(x, index, inverse):
  return gather_rows(x, index, inverse), (index, inverse)


def _gather_rows_bwd(residuals, grad):
  index, inverse = residuals
  return gather_rows(grad, inverse, index), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _choice_tokens(tokens: jax.Array, num_selected: int) -> jax.Array:
  """tokens [G, S, D] -> [N, D], each token repeated for its K choices."""
  model_dim = tokens.shape[-1]
  return jnp.broadcast_to(tokens[:, :, None, :], (*tokens.shape[:2], num_selected, model_dim)
                          ).reshape(-1, model_dim)


@struct.dataclass
class _GatherDispatcher:
  """Dispatch by gathering token choices into the rows of a buffer, combine by gathering back.

  choice_row: [N] int32, the row of each token choice, R where it is not dispatched.
  row_choice: [R] int32, the token choice in each row, N where the row is empty.
  weight: [G, S, K] compute dtype, the combine weights (0 where not dispatched).
  """
  choice_row: jax.Array
  row_choice: jax.Array
  weight: jax.Array

  def dispatch_rows(self, tokens: jax.Array) -> jax.Array:
    """tokens [G, S, D] -> rows [R, D]."""
    return gather_rows(_choice_tokens(tokens, self.weight.shape[-1]), self.row_choice,
                       self.choice_row)

  def combine_rows(self, rows: jax.Array) -> jax.Array:
    """rows [R, D] -> [G, S, D], each token the weighted sum of its choices' rows."""
    per_choice = gather_rows(rows, self.choice_row, self.row_choice)  # Shape: [N, D]
    per_choice = per_choice.reshape(*self.weight.shape, rows.shape[-1])  # Shape: [G, S, K, D]
    return jnp.einsum('gskd,gsk->gsd', per_choice, self.weight)


def inverse_rows(choice_row: jax.Array, num_rows: int) -> jax.Array:
  """[N] rows of the choices (num_rows: none) -> [R] choice of each row (N: none)."""
  num_choices = choice_row.shape[0]
  return jnp.full((num_rows,), num_choices, jnp.int32).at[choice_row].set(
      jnp.arange(num_choices, dtype=jnp.int32), mode='drop')


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
class IndicesDispatcher(_GatherDispatcher):
  """The [E, G, C, D] buffers of the einsum method, filled and read by gathers (`gather_rows`):
  never builds a [G, S, E, C] tensor. Row (e * G + g) * C + c is slot c of expert e in group g."""
  capacity: int = struct.field(pytree_node=False, default=0)
  num_experts: int = struct.field(pytree_node=False, default=0)

  @classmethod
  def from_decision(cls, decision: RoutingDecision, dtype) -> 'IndicesDispatcher':
    num_groups = decision.expert_index.shape[0]
    num_rows = decision.num_experts * num_groups * decision.capacity
    group = jnp.arange(num_groups, dtype=jnp.int32)[:, None, None]  # Shape: [G, 1, 1]
    row = (decision.expert_index * num_groups + group) * decision.capacity + decision.position
    choice_row = jnp.where(decision.dispatched, row, num_rows).reshape(-1)  # Shape: [N]
    return cls(choice_row=choice_row, row_choice=inverse_rows(choice_row, num_rows),
               weight=decision.weight.astype(dtype), capacity=decision.capacity,
               num_experts=decision.num_experts)

  def dispatch(self, tokens: jax.Array) -> jax.Array:
    buffer_shape = (self.num_experts, tokens.shape[0], self.capacity, tokens.shape[-1])
    return self.dispatch_rows(tokens).reshape(buffer_shape)

  def combine(self, outputs: jax.Array) -> jax.Array:
    return self.combine_rows(outputs.reshape(-1, outputs.shape[-1]))


def num_rows(num_choices: int, num_experts: int, tile: int) -> int:
  """Rows enough for any routing of `num_choices` dispatched choices when each expert's rows are
  padded to whole tiles: at most num_experts - 1 tiles are partly empty."""
  return (math.ceil(num_choices / tile) + num_experts - 1) * tile


@struct.dataclass
class SortedDispatcher(_GatherDispatcher):
  """The dispatched choices sorted by expert into rows [R, D], each expert's rows padded to a
  whole number of tiles (so no tile is shared by two experts, as in MegaBlocks). Expert e owns
  rows first_row[e] .. first_row[e] + row_count[e] - 1; rows past the last expert's are empty.

  first_row, row_count: [E] int32 (row_count a multiple of `tile`).
  max_group: the most rows one expert can own, G * C (C = S when dropless) rounded up to a tile.
  """
  first_row: jax.Array
  row_count: jax.Array
  tile: int = struct.field(pytree_node=False, default=1)
  max_group: int = struct.field(pytree_node=False, default=0)

  @classmethod
  def from_decision(cls, decision: RoutingDecision, dtype, tile: int) -> 'SortedDispatcher':
    num_experts = decision.num_experts
    expert = jnp.where(decision.dispatched, decision.expert_index, num_experts).reshape(-1)
    # Shape: [N], E for the choices not dispatched: they sort last and get no row
    group_slots = decision.expert_index.shape[0] * decision.capacity  # G * C
    most_dispatched = min(expert.shape[0], num_experts * group_slots)
    total_rows = num_rows(most_dispatched, num_experts, tile)
    counts = jnp.bincount(expert, length=num_experts + 1)  # Shape: [E + 1]
    row_count = -(-counts[:num_experts] // tile) * tile  # Shape: [E]
    first_row = jnp.cumsum(row_count) - row_count  # Shape: [E]
    # Row of the j-th choice of expert e (in choice order): first_row[e] + j.
    row_offset = jnp.append(first_row, total_rows)  # Shape: [E + 1]
    first_choice = jnp.cumsum(counts) - counts  # Shape: [E + 1]
    order = jnp.argsort(expert, stable=True)  # Shape: [N], choices grouped by expert
    sorted_expert = expert[order]  # Shape: [N]
    sorted_row = row_offset[sorted_expert] + jnp.arange(order.shape[0]) - first_choice[
        sorted_expert]
    sorted_row = jnp.where(sorted_expert < num_experts, sorted_row, total_rows)  # Shape: [N]
    choice_row = jnp.zeros_like(sorted_row).at[order].set(sorted_row).astype(jnp.int32)
    return cls(choice_row=choice_row, row_choice=inverse_rows(choice_row, total_rows),
               weight=decision.weight.astype(dtype), first_row=first_row.astype(jnp.int32),
               row_count=row_count.astype(jnp.int32), tile=tile,
               max_group=-(-group_slots // tile) * tile)


@struct.dataclass
class GroupedDispatcher(SortedDispatcher):
  """The sorted rows with exact group sizes (a tile of one row): expert e owns the row_count[e]
  rows after those of experts 0 .. e-1, with no empty row between experts, as grouped matmuls
  (`jax.lax.ragged_dot`) and the ragged exchange (`moejax.exchange`) read them; max_group is
  G * C.
  """

  @classmethod
  def from_decision(cls, decision: RoutingDecision, dtype) -> 'GroupedDispatcher':
    return super().from_decision(decision, dtype, tile=1)


def default_block_size(num_choices: int, num_experts: int) -> int:
  """Rows of the largest block for 'sorted' dispatch: the power of two at or above twice an
  expert's mean load, within [16, 1024]. With a capacity factor up to 2 every expert's rows then
  fit in one block, so each expert's weights are read once a pass (see
  `experts.block_expert_ffn`); dropless overflow goes through more blocks."""
  mean_rows = max(num_choices / num_experts, 1.0)
  return int(min(1024, max(16, 2 ** math.ceil(math.log2(2 * mean_rows)))))


def block_tile(block_size: int) -> int:
  """The unit each expert's rows are padded to for 'sorted' dispatch: block_size / 16, at least
  16 rows (fewer only for smaller blocks). An expert's last block is a multiple of it, so there
  are at most 16 block shapes to compile; the padding costs under tile / 2 rows per expert on
  average (at 4,096 tokens and E = 8: 64-row tiles, about 6% more rows)."""
  return min(block_size, max(16, block_size // 16))


def auto_dispatch(backend: str, dropless: bool) -> str:
  """What dispatch='auto' runs: the path measured fastest on `backend` (benchmarks/RESULTS.md has
  the measurements).

  CPU: 'sorted'. Fastest of the three in training (forward and backward) and in evaluation
    (forward, eval capacity factor 2.0), at E = 8, 32 and 128, top-1 and top-2, at the benchmark
    shape (4,096 tokens, D = 512, F = 2048) and at `make run`'s (8,192 tokens, D = 128, F = 512),
    and by far when dropless (the capacity paths then carry E / K times the tokens); at the
    benchmark shape, top-1, also faster than flaxformer's scatter layer timed beside it.
  TPU: 'einsum' (GShard's one-hot matmuls; not yet measured by moejax).
  GPU and any other backend: 'einsum', or 'indices' when dropless ([G, S, E, S] one-hot tensors
    are too large); 'sorted', a scan over experts, has only been measured on CPU.
  Never 'grouped': XLA:CPU runs its grouped matmuls as dense masked products (E times the
  FLOPs), and it has not yet been timed on a GPU or TPU (`benchmarks/accelerator.py` does).
  """
  if backend == 'cpu':
    return 'sorted'
  if backend == 'tpu' or not dropless:
    return 'einsum'
  return 'indices'


def make_dispatcher(decision: RoutingDecision, method: str, dtype,
                    tile: int = 16) -> BufferDispatcher | RowDispatcher:
  """The dispatcher named `method` for `decision`: a BufferDispatcher ('einsum', 'indices') or a
  RowDispatcher ('sorted', each expert's rows padded to whole tiles of `tile` rows; 'grouped',
  exact group sizes)."""
  if method == 'einsum':
    return EinsumDispatcher.from_decision(decision, dtype)
  if method == 'indices':
    return IndicesDispatcher.from_decision(decision, dtype)
  if method == 'sorted':
    return SortedDispatcher.from_decision(decision, dtype, tile)
  if method == 'grouped':
    return GroupedDispatcher.from_decision(decision, dtype)
  raise ValueError(f'dispatch={method!r} is not one of {DISPATCH_METHODS}')
