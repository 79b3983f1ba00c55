"""Tokens per second of sampling with and without the KV cache, `make run`'s model shape.

  python benchmarks/generation.py [--tokens 120] [--repeats 3]

The Switch decoder of experiments/configs/switch_tiny.py (random weights: the speed does not
depend on them), window L = data.length, a 7-token prompt, greedy; each sampler generates
--tokens tokens, the two taking turns, after one warm-up run each (compilation). Medians; the
tokens are checked equal while the context fits the window. Writes
benchmarks/results/generation.json.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from moejax.models import make_model  # noqa: E402
from moejax.train.config import config_from_file, model_config  # noqa: E402
from moejax.train.sampling import generate  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tokens', type=int, default=120)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'generation.json'))
  args = parser.parse_args()
  config = config_from_file(os.path.join(os.path.dirname(HERE), 'experiments', 'configs',
                                         'switch_tiny.py'))
  model_cfg = model_config(config, vocab_size=259)
  length = config.data.length
  model = make_model(model_cfg)
  ids = jnp.zeros((1, length), jnp.int32)
  params = model.init(jax.random.key(0), ids, ids > -1, True)['params']
  prompt = np.frombuffer(b'ROMEO:\n', np.uint8).astype(np.int32) + 3
  run = lambda cache: generate(model, params, prompt, args.tokens, length, 0.0, 0, cache=cache)
  fits = length - 1 - len(prompt)
  first = {cache: run(cache) for cache in (True, False)}  # warm-up: compiles
  assert (first[True][:fits] == first[False][:fits]).all()
  seconds = {True: [], False: []}
  for _ in range(args.repeats):
    for cache in (True, False):
      start = time.perf_counter()
      run(cache)
      seconds[cache].append(time.perf_counter() - start)
  result = {'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
            'config': 'experiments/configs/switch_tiny.py', 'window': length,
            'prompt_tokens': len(prompt), 'tokens': args.tokens, 'repeats': args.repeats}
  for cache, name in ((True, 'cached'), (False, 'uncached')):
    median = statistics.median(seconds[cache])
    result[name] = {'seconds': median, 'tokens_per_second': args.tokens / median}
  result['speedup'] = result['uncached']['seconds'] / result['cached']['seconds']
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f"{args.tokens} tokens, window {length}: cached {result['cached']['tokens_per_second']:.0f}"
        f" tokens/s, uncached {result['uncached']['tokens_per_second']:.0f} tokens/s "
        f"({result['speedup']:.2f}x) -> {args.out}")


if __name__ == '__main__':
  main()
