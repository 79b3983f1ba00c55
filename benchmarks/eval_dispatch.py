"""Evaluation-mode (forward only, deterministic) time of the MoE layer for each dispatch method.

What `dispatch='auto'` picks on CPU in evaluation comes from here. Shapes as in layer.py:
x [8, 512, 512] float32 (4,096 tokens), F = 2048, ReLU experts, routing groups of 512 tokens, the
eval capacity factor 2.0 (MoeLayer's default) and dropless; E in {8, 32, 128}, K in {1, 2}. All
methods of one (E, K) are compiled, then timed round-robin, `--repeats` rounds, medians reported
beside the FLOP-matched dense FFN's forward pass.

`--shape tiny` times the shape `make run` evaluates instead: x [64, 128, 128] (8,192 tokens),
F = 512, one group per sequence (S = 128), so an expert's capacity is a few tokens.

  python benchmarks/eval_dispatch.py [--repeats 7] [--experts 8 32 128] [--ks 1 2] [--shape tiny]
Writes benchmarks/results/eval_dispatch[_tiny].json and prints a markdown table.
"""
import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

from layer import time_in_turn  # noqa: E402
from moejax import MoeLayer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_CAPACITY_FACTOR = 2.0
METHODS = ('einsum', 'indices', 'sorted')
SHAPES = {'layer': dict(batch=8, length=512, model_dim=512, ffn_dim=2048, group_size=512),
          'tiny': dict(batch=64, length=128, model_dim=128, ffn_dim=512, group_size=128)}


def moe_forward(shape: dict, num_experts: int, k: int, method: str,
                capacity_factor: float | None):
  layer = MoeLayer(num_experts=num_experts, ffn_dim=shape['ffn_dim'],
                   num_selected_experts=k, group_size=shape['group_size'], dispatch=method,
                   eval_capacity_factor=capacity_factor)
  x = jax.random.normal(jax.random.key(0), (shape['batch'], shape['length'], shape['model_dim']))
  params = layer.init(jax.random.key(1), x, True)['params']
  forward = jax.jit(lambda params, x: layer.apply({'params': params}, x, True,
                                                  mutable=['intermediates'])[0])
  return forward, (params, x)


def dense_forward(shape: dict, ffn_dim: int):
  keys = jax.random.split(jax.random.key(2), 3)
  model_dim = shape['model_dim']
  x = jax.random.normal(keys[0], (shape['batch'] * shape['length'], model_dim))
  params = {'wi': jax.random.normal(keys[1], (model_dim, ffn_dim)) * model_dim**-0.5,
            'wo': jax.random.normal(keys[2], (ffn_dim, model_dim)) * ffn_dim**-0.5}
  return jax.jit(lambda p, x: jax.nn.relu(x @ p['wi']) @ p['wo']), (params, x)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--experts', type=int, nargs='+', default=[8, 32, 128])
  parser.add_argument('--ks', type=int, nargs='+', default=[1, 2])
  parser.add_argument('--shape', choices=tuple(SHAPES), default='layer')
  parser.add_argument('--out', default=None, help='default: benchmarks/results/eval_dispatch'
                      '[_tiny].json')
  args = parser.parse_args()
  shape = SHAPES[args.shape]
  suffix = '' if args.shape == 'layer' else f'_{args.shape}'
  args.out = args.out or str(ROOT / f'benchmarks/results/eval_dispatch{suffix}.json')
  header = (f'{platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} '
            f'{jax.default_backend()}; x [{shape["batch"]}, {shape["length"]}, '
            f'{shape["model_dim"]}], F={shape["ffn_dim"]}, groups of {shape["group_size"]}, '
            f'forward only (deterministic), median of {args.repeats}')
  print(header, flush=True)
  rows = []
  for num_experts in args.experts:
    for k in args.ks:
      for factor in (EVAL_CAPACITY_FACTOR, None) if num_experts <= 8 else (EVAL_CAPACITY_FACTOR,):
        steps = {'dense': dense_forward(shape, k * shape['ffn_dim'])}
        for method in METHODS:
          steps[method] = moe_forward(shape, num_experts, k, method, factor)
        seconds = time_in_turn(steps, args.repeats)
        for method in METHODS:
          rows.append({'num_experts': num_experts, 'k': k, 'capacity_factor': factor,
                       'dispatch': method, 'moe_ms': 1e3 * seconds[method],
                       'dense_ms': 1e3 * seconds['dense'],
                       'ratio': seconds[method] / seconds['dense']})
          print(f'E={num_experts:<4} k={k} cf={factor} {method:<8} {1e3 * seconds[method]:8.1f} '
                f'ms  ratio {seconds[method] / seconds["dense"]:.2f}', flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'machine': header, 'rows': rows}, f, indent=1)
  print(f'\n{header}\n\n| E | K | eval capacity factor | dense ms | einsum | indices | sorted | '
        'fastest |\n|---|---|---|---|---|---|---|---|')
  for i in range(0, len(rows), len(METHODS)):
    group = rows[i:i + len(METHODS)]
    best = min(group, key=lambda r: r['moe_ms'])
    cells = ' | '.join(f'{r["moe_ms"]:.1f} ms ({r["ratio"]:.2f})' for r in group)
    print(f'| {group[0]["num_experts"]} | {group[0]["k"]} | {group[0]["capacity_factor"]} | '
          f'{group[0]["dense_ms"]:.1f} | {cells} | {best["dispatch"]} |')


if __name__ == '__main__':
  main()
