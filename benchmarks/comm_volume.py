"""All-to-all bytes per MoE layer, read from the compiled HLO, against the theoretical amount;
and the layer's forward+backward time on 8 simulated devices against 1.

Theory: each of the two all-to-alls hands over the expert buffers, G * E * C slots of D values
(= tokens x K x capacity factor, rounded as capacity is), and all but 1/n of it leaves its device
(n = size of the 'expert' axis). Runs on 8 simulated CPU devices; prints markdown tables.
The 8 "devices" share this machine's cores, so the timing shows the overhead of the
expert-parallel path (shard_map, all-to-alls, per-device scheduling), not a speed-up.
"""
import contextlib
import os
import time

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from moejax import MoeLayer, collect_aux_losses, sharding  # noqa: E402

BATCH, LENGTH, MODEL_DIM, HIDDEN_DIM = 8, 512, 512, 2048


def measure(num_experts: int, k: int, data: int, expert: int) -> dict:
  layer = MoeLayer(num_experts=num_experts, ffn_dim=HIDDEN_DIM, num_selected_experts=k,
                   eval_capacity_factor=1.25)
  mesh = sharding.make_mesh(data=data, expert=expert)
  x = jax.ShapeDtypeStruct((BATCH, LENGTH, MODEL_DIM), jnp.float32,
                           sharding=sharding.batch_sharding(mesh))
  variables = jax.eval_shape(lambda key, x: layer.init(key, x, True), jax.random.key(0), x)
  specs = sharding.param_specs(variables)
  params = jax.tree.map(
      lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)),
      variables, specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
  with jax.set_mesh(mesh):
    hlo = jax.jit(lambda p, x: layer.apply(p, x, True)).lower(params, x).compile().as_text()
  leaving = (expert - 1) / expert
  measured = sharding.all_to_all_bytes(hlo) * mesh.size * leaving
  slots = BATCH * num_experts * layer.capacity(LENGTH, deterministic=True)
  theory = 2 * slots * MODEL_DIM * 4 * leaving
  return {'E': num_experts, 'k': k, 'mesh': f'{data}x{expert}', 'measured': measured,
          'theory': theory}


def step_ms(num_experts: int, mesh_shape: tuple[int, int] | None, repeats: int = 5) -> float:
  """Median ms of the layer's jitted forward+backward (training mode), on one device when
  `mesh_shape` is None, else on a (data, expert) mesh of the 8 devices."""
  layer = MoeLayer(num_experts=num_experts, ffn_dim=HIDDEN_DIM)
  x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, MODEL_DIM))
  variables = layer.init(jax.random.key(1), x, True)

  def loss(params, x):
    out, state = layer.apply(params, x, False, mutable=['intermediates'])
    return jnp.sum(out) + collect_aux_losses(state)['load_balancing_loss']
  step = jax.jit(jax.grad(loss))
  if mesh_shape is None:
    params, mesh = variables, None
  else:
    mesh = sharding.make_mesh(data=mesh_shape[0], expert=mesh_shape[1])
    params, x = sharding.shard_params(variables, mesh), sharding.shard_batch(x, mesh)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    jax.block_until_ready(step(params, x))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(params, x))
      times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  print(f'x [{BATCH}, {LENGTH}, {MODEL_DIM}] float32, one group per sequence (S={LENGTH}), '
        f'capacity factor 1.25, 8 devices\n')
  print('| E | k | mesh (data x expert) | all-to-all bytes / layer (HLO) | theory | ratio |')
  print('|---|---|---|---|---|---|')
  for num_experts, k in [(8, 1), (8, 2), (32, 1), (32, 2)]:
    for data, expert in [(1, 8), (2, 4), (4, 2)]:
      r = measure(num_experts, k, data, expert)
      print(f'| {r["E"]} | {r["k"]} | {r["mesh"]} | {r["measured"] / 2**20:.2f} MiB | '
            f'{r["theory"] / 2**20:.2f} MiB | {r["measured"] / r["theory"]:.3f} |')
  print(f'\nForward+backward of one layer (E=8, k=1, training capacity 1.25, default dispatch), '
        f'median of 5, 8 simulated devices sharing {os.cpu_count()} cores\n')
  print('| placement | ms | / one device |')
  print('|---|---|---|')
  single = step_ms(8, None)
  print(f'| one device | {single:.0f} | 1.00 |')
  for data, expert in [(1, 8), (2, 4), (8, 1)]:
    ms = step_ms(8, (data, expert))
    print(f'| mesh data={data} x expert={expert} | {ms:.0f} | {ms / single:.2f} |')


if __name__ == '__main__':
  main()
