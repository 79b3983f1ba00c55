"""One process of a small expert-parallel training run; prints its loss values as JSON.

  python tests/ep_worker.py --num-processes 1 --devices 8          # the reference
  python tests/ep_worker.py --num-processes 2 --process-id I --devices 4 --port P   # each of 2

Both runs use a (data 2 x expert 4) mesh over 8 devices in all; each process feeds only its own
rows of every batch (`moejax.sharding.process_rows`).
"""
import argparse
import json
import os


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--port', type=int, default=0)
  parser.add_argument('--steps', type=int, default=4)
  args = parser.parse_args()
  from xla_flags import xla_flags  # tests/xla_flags.py, beside this script
  os.environ['XLA_FLAGS'] = xla_flags(args.devices)
  os.environ['JAX_PLATFORMS'] = 'cpu'

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import moejax
  from moejax import distributed, sharding

  if args.num_processes > 1:
    distributed.initialize(f'127.0.0.1:{args.port}', args.num_processes, args.process_id)
  mesh = sharding.make_mesh(data=2, expert=4)
  layer = moejax.MoeLayer(num_experts=8, ffn_dim=32, num_selected_experts=2,
                          train_capacity_factor=1.0, min_expert_capacity=1, router_init_scale=2.0)
  batch, length, model_dim = 16, 8, 16
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(args.steps, batch, length, model_dim)).astype(np.float32)
  targets = np.tanh(inputs @ rng.normal(size=(model_dim, model_dim)).astype(np.float32))
  rows = sharding.process_rows(mesh, batch)  # this process's rows of every batch

  def loss_fn(params, x, y):
    out, state = layer.apply(params, x, True, mutable=['intermediates'])
    aux = moejax.collect_aux_losses(state)
    return jnp.mean((x + out - y)**2) + 1e-2 * aux['load_balancing_loss']

  optimizer = optax.adam(1e-2)
  params = sharding.shard_params(layer.init(jax.random.key(0), inputs[0], True), mesh)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  with jax.set_mesh(mesh):
    for i in range(args.steps):
      x, y = sharding.shard_batch((inputs[i, rows], targets[i, rows]), mesh)
      params, opt_state, loss = step(params, opt_state, x, y)
      losses.append(float(loss))
  expert_shape = params['params']['experts']['wi'].addressable_shards[0].data.shape
  print(json.dumps({'losses': losses, 'process': jax.process_index(),
                    'devices': jax.device_count(), 'local_expert_shape': list(expert_shape),
                    'rows': [rows.start, rows.stop]}))


if __name__ == '__main__':
  main()
