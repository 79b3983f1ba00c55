"""Memory of importing a Hugging Face checkpoint and evaluating one batch with it, float32 and
bfloat16, on generated Mixtral-shaped checkpoints.

  python benchmarks/import_memory.py             # 1.7 GB float32, 1.6 GB bfloat16 (the README's)
  python benchmarks/import_memory.py --small     # 58 MB float32, 54 MB bfloat16, in a minute
  python benchmarks/import_memory.py --dtype bfloat16   # one checkpoint's cases

Writes random weights in hub layout (one tensor at a time, `write_safetensors`) into a temporary
directory: float32 with 4 layers, bfloat16 with 8 (checkpoints of about the same bytes). Then, in
a fresh process per case (`CASES`: each checkpoint as imported, and the bfloat16 one placed as
float32 params, what moejax did before params kept the checkpoint's dtype), on CPU:
  1. import (`moejax.convert.from_hf`): the peak resident memory (VmHWM) above the resident
     memory before it (/proc/self/statm), beside the output (every param) and its largest param.
     Streaming means peak - before ~ output + largest, not 2 x output.
  2. place the params on the device (`jax.device_put`, the host copy dropped): the device bytes,
     which on CPU are the live arrays' `nbytes` (`jax.live_arrays()`; `memory_stats()` is None on
     CPU). An import keeps the checkpoint's dtype, so they are the checkpoint's bytes, plus the
     float32 routers' extra half.
  3. evaluate one batch (`moejax.train.make_eval_step`, B 4 x L 128 random tokens, compiled
     first), in the import's compute dtype (float32) and, for bfloat16 params, in bfloat16 too:
     the peak resident memory during the step (VmHWM reset before it through
     /proc/self/clear_refs) above the resident memory before the import, and above the resident
     memory just before the step (what the step itself adds). On CPU the device is host memory,
     so the first holds the params, the compiler's leftovers and the step's temporaries.
Results: benchmarks/results/import_memory.json (the full size), benchmarks/RESULTS.md.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

FULL = dict(vocab_size=32_000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, intermediate_size=3584, num_local_experts=8)
SMALL = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=1024, num_local_experts=8)
LAYERS = {'float32': 1, 'bfloat16': 2}  # x the size's layers: about the same checkpoint bytes
# Each case: (the checkpoint's dtype, the param dtype it is placed in; None: the import's).
CASES = {'float32': ('float32', None), 'bfloat16': ('bfloat16', None),
         'bfloat16_as_float32': ('bfloat16', 'float32')}
BATCH, LENGTH = 4, 128


def model_fields(small: bool, dtype: str) -> dict:
  fields = dict(SMALL if small else FULL)
  fields['num_hidden_layers'] *= LAYERS[dtype]
  return fields


def write_checkpoint(directory: str, fields: dict, dtype: str) -> None:
  """A random Mixtral checkpoint of `fields` in `dtype`, written one tensor at a time."""
  import ml_dtypes

  from moejax.convert.hf import FAMILIES
  from moejax.convert.safetensors import write_safetensors
  hub = dict(model_type='mixtral', num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
             tie_word_embeddings=False, hidden_act='silu', router_jitter_noise=0.0,
             torch_dtype=dtype, **fields)
  mixtral = FAMILIES['mixtral']
  layout = mixtral.tensors(mixtral.model_config(hub))
  storage = np.dtype(ml_dtypes.bfloat16 if dtype == 'bfloat16' else np.float32)
  shapes = {name: (shape, storage)
            for t in layout for name, shape in zip(t.names, t.hub_shapes())}
  rng = np.random.default_rng(0)
  weight = lambda name, shape: (np.ones(shape, np.float32) if 'norm' in name
                                else 0.02 * rng.standard_normal(shape, np.float32))
  arrays = ((name, weight(name, shape).astype(storage)) for name, (shape, _) in shapes.items())
  write_safetensors(os.path.join(directory, 'model.safetensors'), arrays, shapes)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hub, f)


def _resident_bytes() -> int:
  """This process's resident memory now (Linux: /proc/self/statm)."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _peak_bytes() -> int:
  """This process's peak resident memory since it started or since `_reset_peak` (VmHWM)."""
  with open('/proc/self/status') as f:
    line = next(line for line in f if line.startswith('VmHWM:'))
  return int(line.split()[1]) * 1024


def _reset_peak() -> None:
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def _device_bytes() -> dict:
  import jax
  return {'live_arrays_bytes': sum(x.nbytes for x in jax.live_arrays()),
          'memory_stats': jax.devices()[0].memory_stats()}


def measure(directory: str, place_as: str | None) -> dict:
  """In this process: import `directory`, place its params (cast to `place_as`, as an override
  `--config.model.param_dtype` does, when given), evaluate a batch (see the doc)."""
  import dataclasses

  import jax

  from moejax.convert import from_hf
  from moejax.models import make_model
  from moejax.train import make_eval_step
  before = _resident_bytes()
  start = time.time()
  config, params = from_hf(directory)
  result = {'param_dtype': config.param_dtype, 'before_bytes': before,
            'import_peak_bytes': _peak_bytes(), 'import_seconds': time.time() - start}
  leaves = [x.nbytes for x in jax.tree.leaves(params)]
  routers = [x.nbytes for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if 'router' in jax.tree_util.keystr(path)]
  result.update(output_bytes=sum(leaves), largest_param_bytes=max(leaves),
                float32_router_bytes=sum(routers))
  if place_as and place_as != config.param_dtype:
    config = dataclasses.replace(config, param_dtype=place_as)
    params = jax.tree.map(lambda x: x.astype(np.float32), params)  # every cast is to float32
  params = jax.device_put(params)
  jax.block_until_ready(params)
  result['device'] = _device_bytes()
  rng = np.random.default_rng(0)
  batch = {'targets': rng.integers(0, config.vocab_size, (BATCH, LENGTH), np.int32),
           'weights': np.ones((BATCH, LENGTH), np.float32)}
  dtypes = ['float32'] + (['bfloat16'] if config.param_dtype == 'bfloat16' else [])
  for dtype in dtypes:
    step = make_eval_step(make_model(dataclasses.replace(config, dtype=dtype)))
    compiled = step.lower(params, batch).compile()
    _reset_peak()
    resident, start = _resident_bytes(), time.time()
    out = jax.block_until_ready(compiled(params, batch))
    result[f'eval_{dtype}'] = {
        'resident_before_step_bytes': resident, 'peak_bytes': _peak_bytes(),
        'seconds': time.time() - start,
        'nll_per_token': float(out['nll_sum'] / out['tokens']), 'device_after': _device_bytes()}
    del out, compiled
  return result


def run(small: bool, dtype: str, cases: list[str]) -> dict:
  """Write the checkpoint of `dtype` and measure each case of it in a fresh process."""
  fields = model_fields(small, dtype)
  with tempfile.TemporaryDirectory() as directory:
    write_checkpoint(directory, fields, dtype)
    checkpoint = os.path.getsize(os.path.join(directory, 'model.safetensors'))
    return {case: _result(checkpoint, fields, subprocess.run(
        [sys.executable, __file__, '--measure', directory, '--place-as', CASES[case][1] or ''],
        check=True, capture_output=True, text=True,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}).stdout) for case in cases}


def _result(checkpoint: int, fields: dict, stdout: str) -> dict:
  result = {'checkpoint_bytes': checkpoint, 'model': fields, **json.loads(stdout)}
  result['growth_bytes'] = result['import_peak_bytes'] - result['before_bytes']
  result['growth_over_output'] = result['growth_bytes'] / result['output_bytes']
  for key in [k for k in result if k.startswith('eval_')]:
    result[key]['growth_bytes'] = result[key]['peak_bytes'] - result['before_bytes']
    result[key]['step_growth_bytes'] = (result[key]['peak_bytes']
                                        - result[key]['resident_before_step_bytes'])
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--small', action='store_true')
  parser.add_argument('--dtype', choices=tuple(LAYERS),
                      help="one checkpoint dtype's cases (default: both dtypes')")
  parser.add_argument('--out', help='the JSON to write (default: benchmarks/results/'
                                    'import_memory[_small].json)')
  parser.add_argument('--measure', help=argparse.SUPPRESS)  # the child process
  parser.add_argument('--place-as', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(args.measure, args.place_as or None)))
    return
  results = {}
  for dtype in [args.dtype] if args.dtype else LAYERS:
    results.update(run(args.small, dtype, [c for c, (d, _) in CASES.items() if d == dtype]))
  path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                  f'import_memory{"_small" if args.small else ""}.json')
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)
  mb = lambda n: f'{n / 2**20:,.0f} MiB'
  for case, r in results.items():
    evals = ', '.join(f'eval in {key[5:]} {mb(r[key]["growth_bytes"])} (the step itself '
                      f'{mb(r[key]["step_growth_bytes"])})' for key in r if key.startswith('eval_'))
    print(f'{case}: checkpoint {mb(r["checkpoint_bytes"])}; import {mb(r["growth_bytes"])} above '
          f'the {mb(r["before_bytes"])} before it (output {mb(r["output_bytes"])}, largest param '
          f'{mb(r["largest_param_bytes"])}); on the device {mb(r["device"]["live_arrays_bytes"])}; '
          f'{evals} above the same baseline')
  print(f'-> {path}')


if __name__ == '__main__':
  main()
