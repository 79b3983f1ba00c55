"""Train-step throughput of the default Switch model against its FLOP-matched dense twin.

Times the jit-compiled train step of `experiments/configs/switch_tiny.py` and of the same config with
`model.dense_baseline=True` in turn, in one process (median of several steps after warm-up), and
estimates the share of the Switch step spent routing, dispatching and combining: for one of its MoE
layers, at the shapes the model feeds it, (full layer fwd+bwd) - (its experts alone, fwd+bwd on the
same [E, G*C, D] buffers), times the number of MoE layers, over the step time.

  python benchmarks/train_step.py [--steps 10] [--dispatch auto]
"""
import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax import MoeLayer, collect_aux_losses, expert_ffn  # noqa: E402
from moejax.data.tokenizers import ByteTokenizer  # noqa: E402
from moejax.models import make_model  # noqa: E402
from moejax.train import (config_from_file, init_state, make_optimizer, make_train_step,  # noqa: E402
                          model_config)
from moejax.train.step import dummy_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, *args, steps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def step_ms(config, steps: int) -> float:
  model_cfg = model_config(config, ByteTokenizer.vocab_size)
  model, tx = make_model(model_cfg), make_optimizer(config.train)
  batch = dummy_batch(model_cfg, config.train.batch_size, config.data.length)
  batch['targets'] = jax.random.randint(jax.random.key(0), batch['targets'].shape, 3, 259)
  state = jax.jit(lambda: init_state(model, tx, batch, 0))()
  train_step = make_train_step(model, tx, config.train.load_balancing_loss_coef,
                               config.train.router_z_loss_coef)
  # The step donates its state: keep feeding it the new one.
  holder = [state]

  def run(batch):
    holder[0], metrics = train_step(holder[0], batch)
    return metrics['loss']
  return median_ms(run, batch, steps=steps)


def routing_overhead_ms(config, steps: int) -> tuple[float, float]:
  """(one MoE layer fwd+bwd, its experts alone fwd+bwd) in ms at the model's shapes."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  layer = MoeLayer(num_experts=m.num_experts, expert_hidden_dim=m.ffn_dim,
                   num_selected_experts=m.num_selected_experts,
                   train_capacity_factor=m.train_capacity_factor,
                   eval_capacity_factor=m.eval_capacity_factor,
                   min_expert_capacity=m.min_expert_capacity, group_size=m.group_size,
                   dispatch=m.dispatch, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (config.train.batch_size, config.data.length,
                                            m.model_dim), dtype)
  params = nn.unbox(layer.init(jax.random.key(1), x, True))['params']

  def layer_loss(params, x):
    out, state = layer.apply({'params': params}, x, False, mutable=['intermediates'])
    return jnp.sum(out.astype(jnp.float32)) + collect_aux_losses(state)['load_balancing_loss']
  full = median_ms(jax.jit(jax.grad(layer_loss, argnums=(0, 1))), params, x, steps=steps)

  num_groups = x.shape[0] * x.shape[1] // (m.group_size or x.shape[1])
  capacity = layer.capacity(x.shape[0] * x.shape[1] // num_groups, deterministic=False)
  buffers = jnp.ones((m.num_experts, num_groups * capacity, m.model_dim), dtype)

  def experts_loss(weights, buffers):
    out = expert_ffn(buffers, weights, activation=m.activation, dtype=dtype)
    return jnp.sum(out.astype(jnp.float32))
  experts = median_ms(jax.jit(jax.grad(experts_loss, argnums=(0, 1))), params['experts'],
                      buffers, steps=steps)
  return full, experts


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=str(ROOT / 'experiments/configs/switch_tiny.py'))
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/train_step.json'))
  parser.add_argument('--dispatch', default=None, help="MoeLayer.dispatch (default: the config's)")
  args = parser.parse_args()
  config = config_from_file(Path(args.config))
  if args.dispatch:
    config.model.dispatch = args.dispatch
  tokens = config.train.batch_size * config.data.length
  moe_ms = step_ms(config, args.steps)
  dense_config = config_from_file(Path(args.config))
  dense_config.model.dense_baseline = True
  dense_ms = step_ms(dense_config, args.steps)
  layer_ms, experts_ms = routing_overhead_ms(config, args.steps)
  num_moe_layers = config.model.num_layers // config.model.moe_every
  share = num_moe_layers * (layer_ms - experts_ms) / moe_ms
  result = {'config': os.path.relpath(args.config, ROOT), 'tokens_per_step': tokens,
            'moe_step_ms': moe_ms, 'dense_step_ms': dense_ms, 'ratio': moe_ms / dense_ms,
            'moe_tokens_per_s': tokens / moe_ms * 1e3,
            'dense_tokens_per_s': tokens / dense_ms * 1e3,
            'moe_layer_ms': layer_ms, 'experts_only_ms': experts_ms,
            'num_moe_layers': num_moe_layers, 'routing_dispatch_combine_share': share,
            'dispatch': config.model.dispatch}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'{result["config"]}: {tokens} tokens/step, median of {args.steps} steps')
  print(f'Switch {moe_ms:.1f} ms/step ({result["moe_tokens_per_s"]:,.0f} tokens/s), dense twin '
        f'{dense_ms:.1f} ms/step ({result["dense_tokens_per_s"]:,.0f} tokens/s): '
        f'ratio {result["ratio"]:.3f}')
  print(f'one MoE layer fwd+bwd {layer_ms:.2f} ms, its experts alone {experts_ms:.2f} ms: '
        f'routing+dispatch+combine ~{100 * share:.1f}% of the Switch step '
        f'({num_moe_layers} MoE layers)')


if __name__ == '__main__':
  main()
