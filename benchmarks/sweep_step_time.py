"""Train-step time of a sweep's runs, timed round-robin in one process.

`moejax ablate` trains a sweep's runs one after another, so their step times carry the machine's
drift (10-20% between runs minutes apart on the 2-core CPU). This times the decoder runs of the
named sweeps at their scale (seed 0's config) the way benchmarks/train_step.py does: each
jit-compiled AdamW step once per round, round after round, on a random batch. Reported per run:
the median step time and, against the sweep's reference run, the median and interquartile range
of the per-round ratio (a round's steps share the machine's state).

  python benchmarks/sweep_step_time.py capacity routing speed_quality [--rounds 30]
Writes experiments/results/<sweep>_step_times.csv (run, round, step_time: every round's time, what
the sweeps' step-time and time-to-quality verdicts rest on; `moejax.ablate.committed`) and
benchmarks/results/sweep_step_time.json: one row per run (the rows of sweeps not named are kept).
"""
import argparse
import json
import os
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402

from layer import times_in_turn  # noqa: E402  (benchmarks/layer.py)
from train_step import step_runner  # noqa: E402  (benchmarks/train_step.py)
from moejax.ablate import committed, load_sweep, run_specs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {'capacity': 'top1_cf1.0', 'routing': 'top1', 'precision': 'float32',
             'speed_quality': 'dense', 'experts': 'dense', 'balance_free': 'top2_aux1e-2',
             'fine_grained': 'm1', 'scoring': 'top2_softmax'}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('sweeps', nargs='+', help='sweep names (experiments/ablations/)')
  parser.add_argument('--rounds', type=int, default=30)
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/sweep_step_time.json'))
  parser.add_argument('--results_dir', default=str(ROOT / 'experiments/results'),
                      help='where <sweep>_step_times.csv goes')
  args = parser.parse_args()
  rows = []
  for name in args.sweeps:
    sweep = load_sweep(name)
    configs = {spec.name: spec.config for spec in run_specs(sweep)
               if spec.seed == sweep.seeds[spec.name][0] and spec.config.model.kind == 'decoder'}
    reference = REFERENCE.get(name, next(iter(configs)))
    seconds = times_in_turn({run: step_runner(config) for run, config in configs.items()},
                            args.rounds)
    committed.write_csv(committed.paths(args.results_dir, name)['step_times'],
                        [{'run': run, 'round': i, 'step_time': float(t)}
                         for run, times in seconds.items() for i, t in enumerate(times)],
                        committed.STEP_TIME_COLUMNS)
    print(f'{name}: median of {args.rounds} rounds, ratio to {reference} per round '
          f'(median [interquartile range])')
    for run, times in seconds.items():
      ratio = times / seconds[reference]
      q1, median, q3 = np.percentile(ratio, [25, 50, 75])
      rows.append({'sweep': name, 'run': run, 'reference': reference, 'rounds': args.rounds,
                   'step_ms': 1e3 * float(np.median(times)), 'ratio': float(median),
                   'ratio_q1': float(q1), 'ratio_q3': float(q3)})
      print(f'  {run:24s} {1e3 * np.median(times):7.1f} ms  {median:.3f} [{q1:.3f}, {q3:.3f}]')
  kept = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      kept = [row for row in json.load(f) if row['sweep'] not in args.sweeps]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(kept + rows, f, indent=1)


if __name__ == '__main__':
  main()
