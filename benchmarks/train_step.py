"""Train-step throughput of the default Switch model against its FLOP-matched dense twin.

Times the jit-compiled train step of `experiments/configs/switch_tiny.py` with each dispatch method
asked for, and of the same config with `model.dense_baseline=True`, round-robin in one process
(median of several steps after warm-up, so machine drift hits them alike), and estimates the share
of each Switch step spent routing, dispatching and combining: for one of its MoE layers, at the
shapes the model feeds it, (full layer fwd+bwd) - (its experts alone, fwd+bwd on the
[E, G*C, D] capacity buffers, or for sorted dispatch on T*K/E rows each), times the number of MoE
layers, over the step time.

  python benchmarks/train_step.py [--steps 10] [--dispatch einsum auto]
Writes benchmarks/results/train_step.json: one row per dispatch method.
"""
import argparse
import json
import os
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from layer import median_s, time_in_turn  # noqa: E402  (benchmarks/layer.py)
from moejax import collect_aux_losses, expert_ffn  # noqa: E402
from moejax.data.tokenizers import ByteTokenizer  # noqa: E402
from moejax.models import make_model  # noqa: E402
from moejax.train import (config_from_file, init_state, make_optimizer, make_train_step,  # noqa: E402
                          model_config)
from moejax.train.inputs import dummy_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def step_runner(config):
  """(run, args): run(batch) takes one train step, feeding the donated state back in."""
  model_cfg = model_config(config, ByteTokenizer.vocab_size)
  model, tx = make_model(model_cfg), make_optimizer(config.train)
  batch = dummy_batch(model_cfg, config.train.batch_size, config.data.length)
  batch['targets'] = jax.random.randint(jax.random.key(0), batch['targets'].shape, 3, 259)
  state = jax.jit(lambda: init_state(model, tx, batch, 0))()
  train_step = make_train_step(model, tx, config.train.load_balancing_loss_coef,
                               config.train.router_z_loss_coef)
  holder = [state]

  def run(batch):
    holder[0], metrics = train_step(holder[0], batch)
    return metrics['loss']
  return run, (batch,)


def routing_overhead_ms(config, steps: int) -> tuple[float, float]:
  """(one MoE layer fwd+bwd, its experts alone fwd+bwd) in ms at the model's shapes."""
  m = model_config(config, ByteTokenizer.vocab_size)
  layer = m.moe_layer(causal=True)  # the model's own MoE layer (a decoder's)
  x = jax.random.normal(jax.random.key(0), (config.train.batch_size, config.data.length,
                                            m.model_dim), m.compute_dtype)
  params = layer.init(jax.random.key(1), x, True)['params']
  rngs = {name: jax.random.key(2) for name in ('dropout', 'jitter', 'gating')}

  def layer_loss(params, x):
    out, state = layer.apply({'params': params}, x, False, mutable=['intermediates'], rngs=rngs)
    return jnp.sum(out.astype(jnp.float32)) + collect_aux_losses(state)['load_balancing_loss']
  full = median_s(jax.jit(jax.grad(layer_loss, argnums=(0, 1))), (params, x), steps)

  num_tokens = x.shape[0] * x.shape[1]
  num_groups = num_tokens // (m.group_size or x.shape[1])
  if layer.dispatch_method(sharded=False, deterministic=False) == 'sorted':
    # the experts see only the dispatched rows
    rows = num_tokens * m.num_selected_experts // m.num_experts
  else:  # the experts run on the whole [E, G * C, D] capacity buffers
    rows = num_groups * layer.capacity(num_tokens // num_groups, deterministic=False)
  buffers = jnp.ones((m.num_experts, rows, m.model_dim), m.compute_dtype)

  def experts_loss(weights, buffers):
    out = expert_ffn(buffers, weights, activation=m.activation, dtype=m.compute_dtype)
    return jnp.sum(out.astype(jnp.float32))
  experts = median_s(jax.jit(jax.grad(experts_loss, argnums=(0, 1))),
                     (params['experts'], buffers), steps)
  return 1e3 * full, 1e3 * experts


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=str(ROOT / 'experiments/configs/switch_tiny.py'))
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/train_step.json'))
  parser.add_argument('--dispatch', nargs='+', default=['einsum', 'auto'],
                      help='MoeLayer.dispatch methods to time (the config has its own)')
  args = parser.parse_args()
  configs = {}
  for dispatch in args.dispatch:
    configs[dispatch] = config_from_file(Path(args.config))
    configs[dispatch].model.dispatch = dispatch
  configs['dense'] = config_from_file(Path(args.config))
  configs['dense'].model.dense_baseline = True
  seconds = time_in_turn({name: step_runner(config) for name, config in configs.items()},
                         args.steps)
  config = configs['dense']
  tokens = config.train.batch_size * config.data.length
  num_moe_layers = config.model.num_layers // config.model.moe_every
  dense_ms = 1e3 * seconds['dense']
  print(f'{os.path.relpath(args.config, ROOT)}: {tokens} tokens/step, median of {args.steps} '
        f'steps, timed round-robin; dense twin {dense_ms:.1f} ms/step '
        f'({tokens / dense_ms * 1e3:,.0f} tokens/s)')
  rows = []
  for dispatch in args.dispatch:
    moe_ms = 1e3 * seconds[dispatch]
    layer_ms, experts_ms = routing_overhead_ms(configs[dispatch], args.steps)
    share = num_moe_layers * (layer_ms - experts_ms) / moe_ms
    rows.append({'config': os.path.relpath(args.config, ROOT), 'dispatch': dispatch,
                 'tokens_per_step': tokens, 'moe_step_ms': moe_ms, 'dense_step_ms': dense_ms,
                 'ratio': moe_ms / dense_ms, 'moe_tokens_per_s': tokens / moe_ms * 1e3,
                 'dense_tokens_per_s': tokens / dense_ms * 1e3, 'moe_layer_ms': layer_ms,
                 'experts_only_ms': experts_ms, 'num_moe_layers': num_moe_layers,
                 'routing_dispatch_combine_share': share})
    print(f'dispatch={dispatch}: Switch {moe_ms:.1f} ms/step ({tokens / moe_ms * 1e3:,.0f} '
          f'tokens/s), ratio {moe_ms / dense_ms:.3f}; one MoE layer fwd+bwd {layer_ms:.2f} ms, '
          f'its experts alone {experts_ms:.2f} ms: routing+dispatch+combine ~{100 * share:.1f}% '
          f'of the step ({num_moe_layers} MoE layers)')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
