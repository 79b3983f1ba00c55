"""The ragged exchange of expert parallelism: every device sends each expert exactly the rows
routed to it, and gets their results back (MaxText's dropless exchange).

Axis legend (DESIGN.md): n devices along the mesh's 'expert' axis, E experts, E_local = E / n of
them on each device (device j owns experts j * E_local .. (j + 1) * E_local - 1), R rows of a
row buffer, D model width.

Inside `jax.shard_map`, each device holds its dispatched rows sorted by expert
(`dispatch.GroupedDispatcher`), so its rows for device j's experts are one contiguous slice:
  1. all-gather every device's group sizes [E]; sizes[i, j] is what device i sends device j;
  2. `exchange_offsets` gives each device the slices to send and where they land, and the
     exchange (`jax.lax.ragged_all_to_all`) moves them: device j receives the slices of devices
     0, 1, ..., n - 1 one after the other, each sorted by j's experts;
  3. a local permutation sorts the received rows by expert, for the grouped matmuls;
  4. the results go back the same way reversed: the exchange with sizes transposed.
XLA:CPU has no ragged all-to-all: there each slice is padded to the most rows one device can send
another, and an equal-size `jax.lax.all_to_all` moves them (same numbers, more bytes). Which of the
two runs is chosen by the platform the program is lowered for (`jax.lax.platform_dependent`), so a
program lowered for a GPU or TPU on a CPU host holds the ragged exchange (`moejax.platforms`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from moejax.dispatch import gather_rows, inverse_rows


class Offsets(NamedTuple):
  """One device's arguments of `jax.lax.ragged_all_to_all`, each [n] int32, entry j about device
  j: where the slice for j starts in this device's rows (input_offsets) and its size
  (send_sizes), where it starts in j's output (output_offsets), and how many rows j sends here
  (recv_sizes)."""
  input_offsets: jax.Array
  send_sizes: jax.Array
  output_offsets: jax.Array
  recv_sizes: jax.Array


def exchange_offsets(sizes: jax.Array, device: jax.Array | int) -> Offsets:
  """The offsets of `device` when device i sends sizes[i, j] rows to device j (sizes [n, n]).

  A device's rows for device j follow its rows for devices 0 .. j - 1, and on device j the rows
  from device i follow those from devices 0 .. i - 1. Worked example, n = 2, sizes [[1, 2],
  [3, 0]]: device 0 sends row 0 to itself, rows 1-2 to device 1; device 1 sends rows 0-2 to
  device 0. Device 0 then holds [its row 0, device 1's rows 0-2], device 1 [device 0's rows 1-2]:
  device 0's offsets are input [0, 1], send [1, 2], output [0, 0], recv [1, 3]; device 1's
  input [0, 3], send [3, 0], output [1, 2], recv [2, 0].
  The way back is the same exchange with `sizes` transposed.
  """
  send_start = jnp.cumsum(sizes, axis=1) - sizes  # Shape: [n, n], on i: where i's rows for j start
  recv_start = jnp.cumsum(sizes, axis=0) - sizes  # Shape: [n, n], on j: where i's rows land
  return Offsets(input_offsets=send_start[device], send_sizes=sizes[device],
                 output_offsets=recv_start[device], recv_sizes=sizes[:, device])


@struct.dataclass
class ExchangePlan:
  """What one device needs to send its rows to the experts' devices and the results back.

  forward, backward: the offsets of the two exchanges (`exchange_offsets` of sizes and of its
    transpose).
  local_sizes: [n, E_local] int32, rows from device i for this device's expert e.
  order: [n * max_send] int32, the received row in each row of the expert-sorted buffer (a
    permutation: received rows past those sent stay past them); inverse: its inverse.
  max_send: the most rows one device can send another (the static size of a slice).
  """
  forward: Offsets
  backward: Offsets
  local_sizes: jax.Array
  order: jax.Array
  inverse: jax.Array
  max_send: int = struct.field(pytree_node=False, default=0)

  @property
  def group_sizes(self) -> jax.Array:
    """[E_local] rows of each local expert, all devices together."""
    return self.local_sizes.sum(axis=0)


def plan_exchange(group_sizes: jax.Array, num_local_experts: int,
                  max_send: int) -> ExchangePlan:
  """Inside shard_map: the plan for this device's rows, `group_sizes[e]` ([E] int32) of them for
  expert e, sorted by expert; `max_send` bounds the rows it can send one device."""
  all_sizes = jax.lax.all_gather(group_sizes, 'expert')  # Shape: [n, E]
  num_devices = all_sizes.shape[0]
  device = jax.lax.axis_index('expert')
  per_expert = all_sizes.reshape(num_devices, num_devices, num_local_experts)
  # Shape: [n, n, E_local], rows device i sends device j for its local expert e
  sizes = per_expert.sum(axis=-1)  # Shape: [n, n]
  local_sizes = per_expert[:, device]  # Shape: [n, E_local]
  num_received = num_devices * max_send
  order = expert_order(local_sizes, num_received)  # Shape: [n * max_send]
  return ExchangePlan(forward=exchange_offsets(sizes, device),
                      backward=exchange_offsets(sizes.T, device), local_sizes=local_sizes,
                      order=order, inverse=inverse_rows(order, num_received), max_send=max_send)


def expert_order(local_sizes: jax.Array, num_rows: int) -> jax.Array:
  """[num_rows] int32: the received row that goes in each row of the expert-sorted buffer.

  The received rows come in segments, device by device and within one device expert by expert,
  of local_sizes[i, e] rows ([n, E_local]); a stable sort by expert keeps device order within an
  expert, and rows past the segments last.
  """
  num_local_experts = local_sizes.shape[1]
  ends = jnp.cumsum(local_sizes.reshape(-1))  # Shape: [n * E_local]
  segment = jnp.searchsorted(ends, jnp.arange(num_rows), side='right')  # Shape: [num_rows]
  expert = jnp.where(segment < ends.shape[0], segment % num_local_experts, num_local_experts)
  return jnp.argsort(expert, stable=True).astype(jnp.int32)


def to_expert_devices(rows: jax.Array, plan: ExchangePlan) -> jax.Array:
  """Inside shard_map: this device's rows [R, D] (sorted by expert) -> the rows of its own experts
  from every device [n * max_send, D], sorted by expert (`plan.group_sizes` of each)."""
  received = exchange(rows, plan.forward, plan.backward, plan.order.shape[0], plan.max_send)
  return gather_rows(received, plan.order, plan.inverse)


def from_expert_devices(outputs: jax.Array, plan: ExchangePlan, num_rows: int) -> jax.Array:
  """Inside shard_map: the inverse of `to_expert_devices`, [n * max_send, D] -> [num_rows, D],
  after summing the partial results of the F slices over 'model'."""
  outputs = jax.lax.psum(outputs, 'model')  # a no-op copy when the model axis has size 1
  received = gather_rows(outputs, plan.inverse, plan.order)
  return exchange(received, plan.backward, plan.forward, num_rows, plan.max_send)


def exchange(rows: jax.Array, forward: Offsets, backward: Offsets, num_rows: int,
             max_send: int) -> jax.Array:
  """Inside shard_map: rows [R, D] sent over 'expert' by `forward` into [num_rows, D] (zeros
  where nothing lands). Its gradient is the exchange back by `backward`, the offsets with the
  sizes transposed, which needs no collective to build."""
  return _exchange(num_rows, rows.shape[0], max_send, rows, forward, backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _exchange(num_rows, num_in_rows, max_send, rows, forward, backward):
  # Like `rows`, varying over the devices: ragged_all_to_all's result has the type of `output`.
  output = jnp.zeros_like(rows, shape=(num_rows, *rows.shape[1:]))
  return jax.lax.platform_dependent(
      rows, output, forward, cpu=functools.partial(_padded_all_to_all, max_send=max_send),
      default=_ragged_all_to_all)


def _exchange_fwd(num_rows, num_in_rows, max_send, rows, forward, backward):
  return _exchange(num_rows, num_in_rows, max_send, rows, forward, backward), (forward, backward)


def _exchange_bwd(num_rows, num_in_rows, max_send, residuals, grad):
  forward, backward = residuals
  return _exchange(num_in_rows, num_rows, max_send, grad, backward, forward), None, None


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def _ragged_all_to_all(rows: jax.Array, output: jax.Array, offsets: Offsets) -> jax.Array:
  return jax.lax.ragged_all_to_all(rows, output, *offsets, axis_name='expert')


def _padded_all_to_all(rows: jax.Array, output: jax.Array, offsets: Offsets,
                       max_send: int) -> jax.Array:
  """`jax.lax.ragged_all_to_all(rows, output, *offsets, axis_name='expert')` by an equal-size
  all-to-all: each slice padded to `max_send` rows."""
  num_devices = offsets.send_sizes.shape[0]
  slot = jnp.arange(max_send)  # Shape: [max_send]
  send_row = jnp.where(slot < offsets.send_sizes[:, None],
                       offsets.input_offsets[:, None] + slot, rows.shape[0])  # Shape: [n, max_send]
  sent = jnp.take(rows, send_row.reshape(-1), axis=0, mode='fill', fill_value=0)
  received = jax.lax.all_to_all(sent.reshape(num_devices, max_send, -1), 'expert', 0, 0,
                                tiled=True)  # Shape: [n, max_send, D], slice i from device i
  starts = jax.lax.all_to_all(offsets.output_offsets, 'expert', 0, 0, tiled=True)
  # Shape: [n], where device i's slice lands here
  out_row = jnp.where(slot < offsets.recv_sizes[:, None], starts[:, None] + slot,
                      output.shape[0])  # Shape: [n, max_send]
  return output.at[out_row.reshape(-1)].set(received.reshape(-1, rows.shape[-1]), mode='drop')
