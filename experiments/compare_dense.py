"""Switch decoder vs its FLOP-matched dense twin: same config, steps, data and seeds.

  python experiments/compare_dense.py --seeds 0 1 2 [--config experiments/configs/switch_tiny.py]

Trains both models for each seed (work directories runs/compare/<moe|dense>_seed<s>), prints
validation nats/char of each and the per-seed gap, and writes runs/compare/results.json.
"""
import argparse
import json
import os
import time

import numpy as np

from moejax.train import config_from_file, loop


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='experiments/configs/switch_tiny.py')
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--out', default='runs/compare')
  args = parser.parse_args()
  results = []
  for seed in args.seeds:
    for name, dense in (('moe', False), ('dense', True)):
      config = config_from_file(args.config)
      config.seed, config.model.dense_baseline = seed, dense
      start = time.perf_counter()
      summary = loop.train(config, os.path.join(args.out, f'{name}_seed{seed}'), quiet=True)
      results.append({'model': name, 'seed': seed, 'steps': summary['step'],
                      'val_nats_per_char': float(summary['eval']['nats_per_char']),
                      'tokens_per_sec': summary['tokens_per_sec'],
                      'per_token_flops': summary['per_token_flops'],
                      'seconds': time.perf_counter() - start})
      print(json.dumps(results[-1]), flush=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  loss = {m: np.array([r['val_nats_per_char'] for r in results if r['model'] == m])
          for m in ('moe', 'dense')}
  gap = loss['dense'] - loss['moe']
  for m, v in loss.items():
    print(f'{m:>5}: {v.mean():.4f} nats/char (seeds {args.seeds}: '
          + ', '.join(f'{x:.4f}' for x in v) + ')')
  print(f'dense - moe: {gap.mean():.4f} (min {gap.min():.4f}, max {gap.max():.4f})')


if __name__ == '__main__':
  main()
