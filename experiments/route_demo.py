"""Route one batch through MoeLayer with top-1 and top-2 routing and print what the router did.

Inputs are random (a fresh router sees no structure in real text either); the point is to show the
layer's outputs and metrics: expert usage, the fraction of choices dropped by capacity, aux losses.
"""
import time

import jax
import numpy as np

import moejax

BATCH, LENGTH, MODEL_DIM, HIDDEN_DIM, NUM_EXPERTS = 8, 128, 64, 256, 8


def route_once(k: int, x: jax.Array) -> dict:
  layer = moejax.MoeLayer(num_experts=NUM_EXPERTS, ffn_dim=HIDDEN_DIM,
                          num_selected_experts=k, train_capacity_factor=1.25,
                          router_init_scale=1.0)
  variables = layer.init(jax.random.key(0), x, True)
  apply = jax.jit(lambda v, x: layer.apply(v, x, False, mutable=['intermediates']))
  start = time.perf_counter()
  out, state = jax.block_until_ready(apply(variables, x))
  seconds = time.perf_counter() - start
  return {'out': out, 'capacity': layer.capacity(LENGTH, deterministic=False),
          'seconds': seconds, **moejax.collect_aux_losses(state),
          **moejax.collect_routing_metrics(state)}


def main():
  x = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, MODEL_DIM))
  print(f'MoeLayer on x [{BATCH}, {LENGTH}, {MODEL_DIM}]: E={NUM_EXPERTS} experts of width '
        f'{HIDDEN_DIM}, one routing group per sequence (S={LENGTH}), capacity factor 1.25\n')
  for k in (1, 2):
    r = route_once(k, x)
    usage = ' '.join(f'{u:.3f}' for u in np.asarray(r['expert_usage']))
    print(f'top-{k}: capacity C={r["capacity"]} slots/expert/group, '
          f'compile+run {r["seconds"]:.2f}s, output {tuple(r["out"].shape)}')
    print(f'  expert usage      {usage}')
    print(f'  fraction dropped  {float(r["fraction_dropped"]):.4f}')
    print(f'  load-balance loss {float(r["load_balancing_loss"]):.4f}  (1.0 = uniform)')
    print(f'  router z-loss     {float(r["router_z_loss"]):.4f}')
    print(f'  router confidence {float(r["router_confidence"]):.4f}\n')


if __name__ == '__main__':
  main()
