"""MoE layer forward+backward time against a FLOP-matched dense FFN, for every dispatch method.

Shapes: x [8, 512, 512] float32 (4,096 tokens), F = 2048, ReLU experts, routing groups
of 512 tokens, training capacity factor 1.25 (and dropless), E in {8, 32, 128}, K in {1, 2}. The
dense FFN has width K x F: the same FLOPs per token as the MoE layer's experts. For each (E, K)
every variant is compiled, then timed in turn, `--repeats` rounds, so all ratios come from one
run; the median is reported. Also: peak memory of each compiled step (`memory_analysis()`), and
the floor: max(FLOPs / measured matmul rate, expert-weight bytes read and written / measured copy
bandwidth), the time no implementation can beat on this machine. A last row per (E, K), "experts
alone, balanced", runs the E expert FFNs on exactly T * K / E tokens each (no routing, dispatch or
padding): the best a per-expert matmul can do on this backend.

  python benchmarks/layer.py [--repeats 5] [--experts 8 32 128] [--ks 1 2] [--group_size 512]
                             [--flaxformer PATH]
Writes benchmarks/results/layer.json and puts the markdown table into benchmarks/RESULTS.md. With
`--flaxformer` (a google/flaxformer checkout), flaxformer's scatter MoeLayer is timed in the same
turns (`benchmarks/flaxformer_step.py`). Each ratio is also given per round, as the quartiles of
(step time / the dense time of the same round): on a shared machine they show the spread.
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flaxformer_step import flaxformer_step  # noqa: E402
from moejax import ExpertWeights, MoeLayer, collect_aux_losses, expert_ffn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH, LENGTH, MODEL_DIM, HIDDEN_DIM, GROUP_SIZE, CAPACITY_FACTOR = 8, 512, 512, 2048, 512, 1.25
# (name, MoeLayer overrides); 'dropless' is the sorted path with no capacity.
VARIANTS = (('einsum', {'dispatch': 'einsum'}), ('indices', {'dispatch': 'indices'}),
            ('sorted', {'dispatch': 'sorted'}),
            ('sorted dropless', {'dispatch': 'sorted', 'train_capacity_factor': None}))
BALANCED = 'experts alone, balanced'  # the reference row of `balanced_step`
FLAXFORMER = 'flaxformer scatter'  # the row of `flaxformer_step.flaxformer_step`


def moe_step(num_experts: int, k: int, overrides: dict, group_size: int = GROUP_SIZE):
  """(jitted fwd+bwd of the layer, its args, expert-weight bytes)."""
  fields = {'train_capacity_factor': CAPACITY_FACTOR, **overrides}
  layer = MoeLayer(num_experts=num_experts, ffn_dim=HIDDEN_DIM, num_selected_experts=k,
                   group_size=group_size, **fields)
  x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, MODEL_DIM))
  params = layer.init(jax.random.key(1), x, True)['params']

  def loss(params, x):
    out, state = layer.apply({'params': params}, x, False, mutable=['intermediates'])
    return jnp.sum(out) + collect_aux_losses(state)['load_balancing_loss']
  weight_bytes = sum(w.nbytes for w in jax.tree.leaves(params['experts']))
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x), weight_bytes


def balanced_step(num_experts: int, k: int):
  """(jitted fwd+bwd of the E expert FFNs alone on exactly T * K / E tokens each, its args, weight
  bytes): no router, dispatch, combine or padding. What any dispatch method would cost if routing
  were free and perfectly balanced, with this backend's batched matmuls."""
  experts = ExpertWeights(num_experts, HIDDEN_DIM)
  weights = experts.init(jax.random.key(1), MODEL_DIM)['params']
  buffers = jax.random.normal(jax.random.key(0), (num_experts, BATCH * LENGTH // num_experts,
                                                  MODEL_DIM))
  buffers = jnp.concatenate([buffers] * k, axis=1)  # Shape: [E, T * K / E, D]

  def loss(weights, buffers):
    return jnp.sum(expert_ffn(buffers, weights, activation='relu', dtype=jnp.float32))
  weight_bytes = sum(w.nbytes for w in jax.tree.leaves(weights))
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (weights, buffers), weight_bytes


def dense_step(ffn_dim: int):
  """(jitted fwd+bwd of a dense ReLU FFN of width `ffn_dim`, no biases, its args, weight bytes)."""
  keys = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(keys[0], (BATCH * LENGTH, MODEL_DIM))
  params = {'wi': jax.random.normal(keys[1], (MODEL_DIM, ffn_dim)) * MODEL_DIM**-0.5,
            'wo': jax.random.normal(keys[2], (ffn_dim, MODEL_DIM)) * ffn_dim**-0.5}

  def loss(params, x):
    return jnp.sum(jax.nn.relu(x @ params['wi']) @ params['wo'])
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x), 2 * MODEL_DIM * ffn_dim * 4


def peak_bytes(fn, args) -> int:
  """Arguments + outputs + temporaries of the compiled step (an upper bound on its peak)."""
  stats = fn.lower(*args).compile().memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def machine_rates() -> tuple[float, float]:
  """(float32 matmul FLOP/s on [4096, 512] x [512, 2048], copy bandwidth in bytes/s read+write)."""
  a = jnp.ones((BATCH * LENGTH, MODEL_DIM))
  b = jnp.ones((MODEL_DIM, HIDDEN_DIM))
  big = jnp.ones((64 * 2**20,))  # 256 MiB
  matmul, copy = jax.jit(lambda a, b: a @ b), jax.jit(lambda x: x * 2.0)
  flops = 2 * a.shape[0] * MODEL_DIM * HIDDEN_DIM
  return flops / median_s(matmul, (a, b), 7), 2 * big.nbytes / median_s(copy, (big,), 7)


def write_rates(nbytes: int = 256 * 2**20) -> tuple[float, float]:
  """(bytes/s writing freshly allocated memory, bytes/s rewriting the same memory): the first
  write to a page costs a page fault, which on some VMs dominates. Every step's large outputs and
  temporaries are fresh allocations."""
  fresh, touched = [], []
  for _ in range(3):
    start = time.perf_counter()
    buffer = np.empty(nbytes // 4, np.float32)
    buffer.fill(1.0)
    fresh.append(time.perf_counter() - start)
    start = time.perf_counter()
    buffer.fill(2.0)
    touched.append(time.perf_counter() - start)
    del buffer
  return nbytes / float(np.median(fresh)), nbytes / float(np.median(touched))


def median_s(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def times_in_turn(steps: dict, repeats: int) -> dict[str, np.ndarray]:
  """{name: seconds [repeats]} of each step (fn, args), timed round-robin after a warm-up call:
  the steps of one round share the machine's state."""
  for fn, args in steps.values():
    jax.block_until_ready(fn(*args))  # compile and warm up
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, (fn, args) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: np.asarray(t) for name, t in times.items()}


def time_in_turn(steps: dict, repeats: int) -> dict[str, float]:
  """Median seconds of each step, timed round-robin so they share the machine's state."""
  return {name: float(np.median(t)) for name, t in times_in_turn(steps, repeats).items()}


def measure(num_experts: int, k: int, repeats: int, matmul_rate: float, bandwidth: float,
            group_size: int, flaxformer: str | None = None):
  tokens = BATCH * LENGTH
  steps, weight_bytes, peaks = {}, {}, {}
  fn, args, weight_bytes['dense'] = dense_step(k * HIDDEN_DIM)
  steps['dense'] = (fn, args)
  for name, overrides in VARIANTS:
    fn, args, weight_bytes[name] = moe_step(num_experts, k, overrides, group_size)
    steps[name] = (fn, args)
  fn, args, weight_bytes[BALANCED] = balanced_step(num_experts, k)
  steps[BALANCED] = (fn, args)
  if flaxformer:
    x = jax.random.normal(jax.random.key(0), (BATCH, LENGTH, MODEL_DIM))
    fn, args, weight_bytes[FLAXFORMER] = flaxformer_step(
        flaxformer, x, num_experts, k, HIDDEN_DIM, group_size, CAPACITY_FACTOR)
    steps[FLAXFORMER] = (fn, args)
  for name, (fn, args) in steps.items():
    peaks[name] = peak_bytes(fn, args)
  times = times_in_turn(steps, repeats)
  seconds = {name: float(np.median(t)) for name, t in times.items()}
  flops = 3 * 2 * 2 * tokens * k * MODEL_DIM * HIDDEN_DIM  # fwd + bwd (2x), two matmuls
  # The dense step itself may beat the separately measured matmul rate: take the faster.
  rate = max(matmul_rate, flops / seconds['dense'])
  floor_s = max(flops / rate, 3 * weight_bytes['sorted'] / bandwidth)
  dense_excl = peaks['dense'] - 2 * weight_bytes['dense']
  rows = []
  for name in [name for name in steps if name != 'dense']:
    excl = peaks[name] - 2 * weight_bytes[name]  # the weights and their gradients
    per_round = times[name] / times['dense']  # Shape: [repeats]
    rows.append({'dispatch': name, 'num_experts': num_experts, 'k': k,
                 'moe_ms': 1e3 * seconds[name], 'dense_ms': 1e3 * seconds['dense'],
                 'ratio': seconds[name] / seconds['dense'],
                 'round_ratio_quartiles': [float(q) for q in np.percentile(per_round,
                                                                          [25, 50, 75])],
                 'peak_bytes': peaks[name],
                 'dense_peak_bytes': peaks['dense'], 'peak_bytes_excl_weights': excl,
                 'dense_peak_bytes_excl_weights': dense_excl,
                 'memory_ratio_excl_weights': excl / dense_excl,
                 'floor_ms': 1e3 * floor_s, 'floor_ratio': floor_s / seconds['dense']})
  return rows


def markdown(rows: list[dict], header: str) -> str:
  lines = [header, '',
           '| dispatch | E | k | MoE ms | dense ms | ratio (per round: quartiles) | floor ratio | '
           'peak MiB (excl. weights) | dense peak MiB (excl.) | memory ratio |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["dispatch"]} | {r["num_experts"]} | {r["k"]} | {r["moe_ms"]:.1f} | '
                 f'{r["dense_ms"]:.1f} | **{r["ratio"]:.2f}** ({quartiles(r)}) | '
                 f'{r["floor_ratio"]:.2f} | '
                 f'{r["peak_bytes"] / 2**20:.0f} ({r["peak_bytes_excl_weights"] / 2**20:.0f}) | '
                 f'{r["dense_peak_bytes"] / 2**20:.0f} ({r["dense_peak_bytes_excl_weights"] / 2**20:.0f}) | '
                 f'{r["memory_ratio_excl_weights"]:.2f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--experts', type=int, nargs='+', default=[8, 32, 128])
  parser.add_argument('--ks', type=int, nargs='+', default=[1, 2])
  parser.add_argument('--group_size', type=int, default=GROUP_SIZE,
                      help='tokens per routing group (the einsum path costs O(S) per token)')
  parser.add_argument('--flaxformer', default=None,
                      help="a google/flaxformer checkout: time its scatter MoeLayer too")
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/layer.json'))
  parser.add_argument('--results', default=str(ROOT / 'benchmarks/RESULTS.md'),
                      help="markdown file whose layer table is replaced ('' for none)")
  args = parser.parse_args()
  matmul_rate, bandwidth = machine_rates()
  fresh_rate, touched_rate = write_rates()
  header = (f'{platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__} '
            f'{jax.default_backend()}; float32 matmul {matmul_rate / 1e9:.0f} GFLOP/s, copy '
            f'{bandwidth / 1e9:.1f} GB/s (read+write), writes to fresh pages '
            f'{fresh_rate / 1e9:.1f} GB/s and to touched ones {touched_rate / 1e9:.1f} GB/s; '
            f'x [{BATCH}, {LENGTH}, {MODEL_DIM}], '
            f'F={HIDDEN_DIM}, groups of {args.group_size}, capacity factor {CAPACITY_FACTOR}, '
            f'fwd+bwd, median of {args.repeats}')
  print(header, flush=True)
  rows = []
  for num_experts in args.experts:
    for k in args.ks:
      new = measure(num_experts, k, args.repeats, matmul_rate, bandwidth, args.group_size,
                    args.flaxformer)
      for r in new:
        print(f'E={num_experts:<4} k={k} {r["dispatch"]:<16} {r["moe_ms"]:8.1f} ms  dense '
              f'{r["dense_ms"]:7.1f} ms  ratio {r["ratio"]:.3f} (per round {quartiles(r)})  '
              f'floor {r["floor_ratio"]:.2f}  '
              f'memory {r["memory_ratio_excl_weights"]:.2f}', flush=True)
      rows.extend(new)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'machine': header, 'rows': rows}, f, indent=1)
  table = markdown(rows, header)
  print()
  print(table)
  if args.results:
    write_table(Path(args.results), table)


def quartiles(row: dict) -> str:
  q1, median, q3 = row['round_ratio_quartiles']
  return f'{median:.2f} [{q1:.2f}, {q3:.2f}]'


def write_table(results: Path, table: str):
  """Put `table` between the layer-table markers of RESULTS.md (appended if they are missing)."""
  begin, end = '<!-- layer.py table: begin -->', '<!-- layer.py table: end -->'
  text = results.read_text() if results.exists() else ''
  block = f'{begin}\n{table}\n{end}'
  if begin in text and end in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip('\n') + '\n\n' + block + '\n'
  results.write_text(text)


if __name__ == '__main__':
  main()
