"""The ragged exchange of expert parallelism: its offsets against a NumPy model of
`jax.lax.ragged_all_to_all`, and the exchange itself on 8 simulated CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moejax import exchange, sharding


def _ragged_all_to_all(operands, outputs, offsets):
  """NumPy model of `jax.lax.ragged_all_to_all` over n devices (its docstring's pseudocode):
  device i sends operands[i][input_offsets[j]:][:send_sizes[j]] to device j, which writes it at
  the offset device i named for it, output_offsets[j]; recv_sizes must agree."""
  results = [np.array(output) for output in outputs]
  for i, (operand, off) in enumerate(zip(operands, offsets)):
    for j in range(len(operands)):
      size = int(off.send_sizes[j])
      assert size == int(offsets[j].recv_sizes[i])
      start, out = int(off.input_offsets[j]), int(off.output_offsets[j])
      assert out + size <= len(results[j])
      results[j][out:out + size] = operand[start:start + size]
  return results


def _random_sizes(rng, num_devices, num_local_experts, most=4):
  """[n, E] rows of each device for each expert, up to `most`, about a third of them empty."""
  sizes = rng.integers(0, most + 1, (num_devices, num_devices * num_local_experts))
  return np.where(rng.random(sizes.shape) < 0.3, 0, sizes)


def _tagged_rows(sizes):
  """Each device's rows sorted by expert, each row tagged (device, expert, k-th row of it)."""
  return [np.array([(i, e, k) for e, count in enumerate(row) for k in range(count)],
                   int).reshape(-1, 3) for i, row in enumerate(sizes)]


@pytest.mark.parametrize('num_devices,num_local_experts,seed', [
    (1, 3, 0), (2, 1, 1), (2, 3, 2), (4, 2, 3), (8, 1, 4), (8, 2, 5), (3, 4, 6)])
def test_offsets_move_every_row_to_its_expert_and_back(num_devices, num_local_experts, seed):
  """On random group sizes with empty experts: every row lands on the device of its expert,
  once; sorted by expert there it runs expert by expert, device order within one; the way back
  (sizes transposed) returns every row to its own place."""
  rng = np.random.default_rng(seed)
  sizes = _random_sizes(rng, num_devices, num_local_experts)  # Shape: [n, E]
  assert (sizes == 0).any()
  rows = _tagged_rows(sizes)
  device_sizes = sizes.reshape(num_devices, num_devices, num_local_experts).sum(-1)  # [n, n]
  forward = [exchange.exchange_offsets(device_sizes, i) for i in range(num_devices)]
  backward = [exchange.exchange_offsets(device_sizes.T, i) for i in range(num_devices)]
  max_received = device_sizes.sum(0).max() + 2  # two spare rows at the end
  empty = -np.ones((max_received, 3), int)
  received = _ragged_all_to_all(rows, [empty] * num_devices, forward)
  for j in range(num_devices):
    count = device_sizes[:, j].sum()
    expected = [tag for i in range(num_devices) for tag in rows[i]
                if tag[1] // num_local_experts == j]  # device by device, in their order
    np.testing.assert_array_equal(received[j][:count], np.reshape(expected, (-1, 3)))
    np.testing.assert_array_equal(received[j][count:], -1)
    local_sizes = sizes[:, j * num_local_experts:(j + 1) * num_local_experts]  # [n, E_local]
    order = np.asarray(exchange.expert_order(jnp.asarray(local_sizes), max_received))
    assert sorted(order) == list(range(max_received))  # a permutation
    by_expert = received[j][order]
    keys = [(e, i, k) for i, e, k in by_expert[:count]]
    assert keys == sorted(keys)  # expert by expert, then device, then the device's order
    np.testing.assert_array_equal(by_expert[count:], -1)
  back = _ragged_all_to_all(received, [-np.ones_like(r) for r in rows], backward)
  for i in range(num_devices):
    np.testing.assert_array_equal(back[i], rows[i])


def test_offsets_worked_example():
  """The docstring's example: n = 2, device 0 sends 1 row to itself and 2 to device 1, device
  1 sends 3 rows to device 0."""
  sizes = jnp.array([[1, 2], [3, 0]])
  assert [list(map(int, o)) for o in exchange.exchange_offsets(sizes, 0)] == [
      [0, 1], [1, 2], [0, 0], [1, 3]]
  assert [list(map(int, o)) for o in exchange.exchange_offsets(sizes, 1)] == [
      [0, 3], [3, 0], [1, 2], [2, 0]]


NUM_DEVICES, LOCAL_EXPERTS, ROWS, D = 8, 2, 32, 3


@functools.lru_cache(maxsize=None)
def _round_trip():
  """jit of (to_expert_devices, from_expert_devices after it) on a 1 x 8 mesh: each device's
  rows [ROWS, D] and group sizes [E] in, the rows at its experts' devices and the rows back."""
  mesh = sharding.make_mesh(data=1, expert=NUM_DEVICES)

  def per_device(rows, group_sizes):
    plan = exchange.plan_exchange(group_sizes[0], LOCAL_EXPERTS, max_send=ROWS)
    at_experts = exchange.to_expert_devices(rows, plan)
    back = exchange.from_expert_devices(at_experts * 2.0, plan, ROWS)
    return at_experts, plan.group_sizes[None], back

  spec = P('expert')
  return mesh, jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec),
                                     out_specs=(spec, spec, spec)))


def test_exchange_on_8_devices_equals_the_model_and_returns_every_row():
  """The equal-size all-to-all emulation (what XLA:CPU runs) gives the NumPy model's rows, sorted by
  expert, on every device; the way back returns each row (here doubled) to its place, and the
  gradient of the round trip is 2 on every sent row, 0 past them."""
  mesh, round_trip = _round_trip()
  sizes = _random_sizes(np.random.default_rng(7), NUM_DEVICES, LOCAL_EXPERTS, most=2)
  sizes[3] = 0  # a device that sends nothing
  sizes[:, 5] = 0  # an expert nobody chose
  rows = np.zeros((NUM_DEVICES, ROWS, D), np.float32)
  for i, tags in enumerate(_tagged_rows(sizes)):
    rows[i, :len(tags)] = tags + 1  # tags from 1: zeros are empty rows
  x = jax.device_put(jnp.asarray(rows.reshape(-1, D)), jax.NamedSharding(mesh, P('expert')))
  counts = jnp.asarray(sizes, jnp.int32)
  at_experts, group_sizes, back = round_trip(x, counts)
  at_experts = np.asarray(at_experts).reshape(NUM_DEVICES, -1, D)
  np.testing.assert_array_equal(np.asarray(group_sizes).reshape(NUM_DEVICES, LOCAL_EXPERTS),
                                sizes.sum(0).reshape(NUM_DEVICES, LOCAL_EXPERTS))
  for j in range(NUM_DEVICES):
    experts = range(j * LOCAL_EXPERTS, (j + 1) * LOCAL_EXPERTS)
    expected = sorted((tuple(tag) for tag in rows.reshape(-1, D) if tag[1] - 1 in experts),
                      key=lambda tag: (tag[1], tag[0], tag[2]))
    count = len(expected)
    np.testing.assert_array_equal(at_experts[j][:count], np.reshape(expected, (-1, D)))
    np.testing.assert_array_equal(at_experts[j][count:], 0.0)
  np.testing.assert_array_equal(np.asarray(back), 2 * rows.reshape(-1, D))
  grad = jax.grad(lambda x: jnp.sum(round_trip(x, counts)[2]))(x)
  np.testing.assert_array_equal(np.asarray(grad), 2.0 * (rows.reshape(-1, D) != 0))

