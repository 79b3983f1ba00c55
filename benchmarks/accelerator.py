"""Every dispatch path on this backend: the MoE layer and a model's train step, for the choice of
`dispatch='auto'` on GPUs and TPUs.

For each size, the layer's forward+backward (or one AdamW train step of a Switch decoder, from
`experiments/configs/switch_tiny.py` resized) with dispatch einsum, indices, sorted and grouped
is compiled, then the four are timed round-robin in one process (`layer.times_in_turn`, after a
warm-up call each) and their medians reported, with each one's ratio to the fastest. Sizes:
  accelerator (the default): 8,192-token layers (D 1024; E 8 with and without a capacity, E 64)
    and 8,192-token steps of a 4-block, D 512 decoder (E 8 and 64), bfloat16; meant to take a
    few minutes on one GPU.
  medium: the layer at benchmarks/layer.py's shape (4,096 tokens, D 512, F 2048, E 8, top-2, with
    and without a capacity) and switch_tiny's own step, float32; 5 minutes on 2 cores with
    `--repeats 5`.
  small (`--small`): tiny shapes, about 30 seconds on a CPU (`tests/test_accelerator_benchmark.py`).

  python benchmarks/accelerator.py [--size accelerator|medium|small] [--small] [--repeats 10]
      [--out FILE.json]
Writes benchmarks/results/accelerator_<backend>[_<size>].json and, beside it, the same rows as a
markdown table (.md), which benchmarks/RESULTS.md quotes with the chip's name.
"""
import argparse
import json
import os
import platform
from pathlib import Path

# Every backend there is: benchmarks/layer.py, imported below, would otherwise default to the CPU.
os.environ.setdefault('JAX_PLATFORMS', '')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from layer import times_in_turn  # noqa: E402  (benchmarks/layer.py)
from moejax import MoeLayer, collect_aux_losses  # noqa: E402
from moejax.train import config_from_file  # noqa: E402
from train_step import step_runner  # noqa: E402  (benchmarks/train_step.py)

ROOT = Path(__file__).resolve().parents[1]
SWITCH_TINY = ROOT / 'experiments/configs/switch_tiny.py'
DISPATCHES = ('einsum', 'indices', 'sorted', 'grouped')
# Layer sizes: x [batch, length, model_dim], ffn_dim, E, K, group_size, train capacity factor
# (None: dropless).
LAYER_SIZES = {
    'small': [dict(batch=2, length=32, model_dim=16, ffn_dim=32, num_experts=4, k=2,
                   group_size=32, capacity_factor=1.25),
              dict(batch=2, length=32, model_dim=16, ffn_dim=32, num_experts=4, k=2,
                   group_size=32, capacity_factor=None)],
    'medium': [dict(batch=8, length=512, model_dim=512, ffn_dim=2048, num_experts=8, k=2,
                 group_size=512, capacity_factor=1.25),
            dict(batch=8, length=512, model_dim=512, ffn_dim=2048, num_experts=8, k=2,
                 group_size=512, capacity_factor=None)],
    'accelerator': [dict(batch=8, length=1024, model_dim=1024, ffn_dim=4096, num_experts=8, k=2,
                         group_size=1024, capacity_factor=1.25),
                    dict(batch=8, length=1024, model_dim=1024, ffn_dim=4096, num_experts=8, k=2,
                         group_size=1024, capacity_factor=None),
                    dict(batch=8, length=1024, model_dim=1024, ffn_dim=1024, num_experts=64,
                         k=2, group_size=1024, capacity_factor=1.25)],
}
# Train-step sizes: overrides of switch_tiny's model and data/train fields.
STEP_SIZES = {
    'small': [dict(model=dict(num_layers=1, moe_every=1, model_dim=32, num_heads=2, ffn_dim=64,
                              num_experts=4, num_selected_experts=2), batch_size=4, length=32)],
    'medium': [dict(model={}, batch_size=32, length=128)],
    'accelerator': [dict(model=dict(num_layers=4, model_dim=512, num_heads=8, ffn_dim=2048,
                                    num_experts=8, num_selected_experts=2),
                         batch_size=16, length=512),
                    dict(model=dict(num_layers=4, model_dim=512, num_heads=8, ffn_dim=512,
                                    num_experts=64, num_selected_experts=2),
                         batch_size=16, length=512)],
}


def layer_step(size: dict, dispatch: str, dtype):
  """(jitted fwd+bwd of a MoeLayer of `size` in training mode, its args)."""
  layer = MoeLayer(num_experts=size['num_experts'], ffn_dim=size['ffn_dim'],
                   num_selected_experts=size['k'], group_size=size['group_size'],
                   train_capacity_factor=size['capacity_factor'], dispatch=dispatch, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (size['batch'], size['length'], size['model_dim']),
                        dtype)
  params = layer.init(jax.random.key(1), x, True)['params']

  def loss(params, x):
    out, state = layer.apply({'params': params}, x, False, mutable=['intermediates'])
    return jnp.sum(out.astype(jnp.float32)) + collect_aux_losses(state)['load_balancing_loss']
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def train_config(size: dict, dispatch: str, dtype: str):
  """switch_tiny resized to `size`, with `dispatch` in its MoE layers."""
  config = config_from_file(SWITCH_TINY)
  config.model.update(size['model'], dispatch=dispatch, dtype=dtype)
  config.train.batch_size = size['batch_size']
  config.data.length = size['length']
  return config


def layer_name(size: dict) -> str:
  factor = size['capacity_factor']
  return (f'layer x [{size["batch"]}, {size["length"]}, {size["model_dim"]}], F {size["ffn_dim"]}, '
          f'E {size["num_experts"]}, K {size["k"]}, groups of {size["group_size"]}, '
          f'{"dropless" if factor is None else f"capacity factor {factor}"}, fwd+bwd')


def step_name(config) -> str:
  m = config.model
  return (f'train step, {m.num_layers} blocks x {m.model_dim}, E {m.num_experts}, '
          f'K {m.num_selected_experts}, F {m.ffn_dim}, {config.train.batch_size} x '
          f'{config.data.length} tokens')


def measure(name: str, size: dict, steps: dict, repeats: int) -> dict:
  """One row: the median ms of each dispatch's step, timed in turn, and the fastest."""
  seconds = times_in_turn(steps, repeats)
  median_ms = {dispatch: 1e3 * float(np.median(t)) for dispatch, t in seconds.items()}
  row = {'what': name, 'size': size, 'median_ms': median_ms,
         'fastest': min(median_ms, key=median_ms.get)}
  print(markdown_row(row), flush=True)
  return row


def markdown_row(row: dict) -> str:
  best = row['median_ms'][row['fastest']]
  cells = [f'{row["median_ms"][d]:.2f} ({row["median_ms"][d] / best:.2f})' for d in DISPATCHES]
  return f'| {row["what"]} | {" | ".join(cells)} | {row["fastest"]} |'


def markdown(rows: list[dict], header: str) -> str:
  return '\n'.join([header, '', f'| what | {" | ".join(DISPATCHES)} | fastest |',
                    '|---' * (len(DISPATCHES) + 2) + '|', *map(markdown_row, rows)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', choices=list(LAYER_SIZES), default='accelerator')
  parser.add_argument('--small', dest='size', action='store_const', const='small',
                      help='--size small: tiny shapes, seconds on a CPU')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--out', help='the JSON file (default benchmarks/results/'
                      'accelerator_<backend>[_<size>].json); the table goes beside it (.md)')
  args = parser.parse_args()
  backend = jax.default_backend()
  suffix = '' if args.size == 'accelerator' else f'_{args.size}'
  out = Path(args.out or ROOT / f'benchmarks/results/accelerator_{backend}{suffix}.json')
  dtype = 'float32' if backend == 'cpu' else 'bfloat16'
  device = jax.devices()[0].device_kind
  header = (f'{device} ({backend}, {jax.device_count()} devices), {platform.machine()} host with '
            f'{os.cpu_count()} cores, JAX {jax.__version__}; {dtype} compute; ms, median of '
            f'{args.repeats} timed round-robin after a warm-up (ratio to the fastest)')
  print(header, flush=True)
  rows = []
  for size in LAYER_SIZES[args.size]:
    rows.append(measure(layer_name(size), size, {
        d: layer_step(size, d, jnp.dtype(dtype)) for d in DISPATCHES}, args.repeats))
  for size in STEP_SIZES[args.size]:
    configs = {d: train_config(size, d, dtype) for d in DISPATCHES}
    rows.append(measure(step_name(configs['einsum']), size, {
        d: step_runner(config) for d, config in configs.items()}, args.repeats))
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'machine': header, 'backend': backend, 'device': device,
                             'rows': rows}, indent=1))
  table = markdown(rows, header)
  out.with_suffix('.md').write_text(table + '\n')
  print(f'\n{table}\nwrote {out} and {out.with_suffix(".md")}')


if __name__ == '__main__':
  main()
