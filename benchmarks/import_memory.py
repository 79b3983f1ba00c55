"""Peak host memory of `moejax.convert.from_hf` on a generated Mixtral-shaped checkpoint.

  python benchmarks/import_memory.py             # ~1.6 GB checkpoint (README's figure)
  python benchmarks/import_memory.py --small     # ~60 MB, in seconds

Writes random float32 weights in hub layout (one tensor at a time, `write_safetensors`) into a
temporary directory, then imports it in a fresh process and reports that process's peak resident
memory (ru_maxrss) above its resident memory just before the import (Linux's /proc/self/statm), next
to the size of the output (every param) and of the largest single param. Streaming means peak -
before ~ output + largest, not 2 x output. Results: benchmarks/results/import_memory.json (the full
size).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np

SIZES = {'full': dict(vocab_size=32_000, hidden_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, intermediate_size=3584,
                      num_local_experts=8),
         'small': dict(vocab_size=4096, hidden_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024,
                       num_local_experts=8)}


def write_checkpoint(directory: str, fields: dict) -> None:
  """A random Mixtral checkpoint of `fields`, written one tensor at a time."""
  from moejax.convert.hf import FAMILIES
  from moejax.convert.safetensors import write_safetensors
  hub = dict(model_type='mixtral', num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
             tie_word_embeddings=False, hidden_act='silu', **fields)
  mixtral = FAMILIES['mixtral']
  layout = mixtral.tensors(mixtral.read(hub))
  shapes = {name: (shape, np.float32)
            for t in layout for name, shape in zip(t.names, t.hub_shapes())}
  rng = np.random.default_rng(0)
  arrays = ((name, rng.standard_normal(shape, np.float32)) for name, (shape, _) in shapes.items())
  write_safetensors(os.path.join(directory, 'model.safetensors'), arrays, shapes)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hub, f)


def _resident_bytes() -> int:
  """This process's resident memory now (Linux: /proc/self/statm)."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def measure(directory: str) -> dict:
  """In this process: import `directory`; resident memory before and at the peak."""
  import jax  # noqa: F401  (loaded before the baseline, as in any moejax program)

  from moejax.convert import from_hf
  before = _resident_bytes()
  _, params = from_hf(directory)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  leaves = [x.nbytes for x in jax.tree.leaves(params)]
  return {'before_bytes': before, 'peak_bytes': peak, 'output_bytes': sum(leaves),
          'largest_param_bytes': max(leaves)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--small', action='store_true')
  parser.add_argument('--out', help='the JSON to write (default: benchmarks/results/'
                                    'import_memory[_small].json)')
  parser.add_argument('--measure', help=argparse.SUPPRESS)  # the child process
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(args.measure)))
    return
  size = 'small' if args.small else 'full'
  with tempfile.TemporaryDirectory() as directory:
    write_checkpoint(directory, SIZES[size])
    checkpoint = os.path.getsize(os.path.join(directory, 'model.safetensors'))
    out = subprocess.run([sys.executable, __file__, '--measure', directory], check=True,
                         capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  result = {'checkpoint_bytes': checkpoint, 'model': SIZES[size], **json.loads(out.stdout)}
  result['growth_bytes'] = result['peak_bytes'] - result['before_bytes']
  result['growth_over_output'] = result['growth_bytes'] / result['output_bytes']
  path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                  f'import_memory{"_small" if args.small else ""}.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  mb = lambda n: f'{n / 2**20:,.0f} MiB'
  print(f'checkpoint {mb(checkpoint)}; import: {mb(result["growth_bytes"])} above the '
        f'{mb(result["before_bytes"])} before it (output {mb(result["output_bytes"])}, largest '
        f'param {mb(result["largest_param_bytes"])}; {result["growth_over_output"]:.2f} x the '
        f'output) -> {path}')


if __name__ == '__main__':
  main()
