"""Sparse upcycling vs training the MoE from scratch, against the dense model they are measured by.

  python experiments/upcycle.py [--config experiments/configs/upcycle_tiny.py] [--at 300]

Three runs of the same data, seed and schedule (work directories under --out):
  dense     the dense source (config with dense_baseline=True, num_selected_experts=1), all steps;
  scratch   the MoE from a fresh init, all steps;
  upcycled  the MoE upcycled from the dense run's checkpoint at step --at, then trained to the end
            (same learning-rate schedule and batches as the dense run from there).
A finished run is not trained again. Prints validation loss (nats/char) at every evaluation, the
first step at which each MoE run is below the dense run at the same step, and writes
<out>/results.json.
"""
import argparse
import json
import os

from moejax.train import config_from_file, loop


def eval_curve(workdir: str) -> dict[int, float]:
  """{step: validation nats/char} from a run's metrics.jsonl."""
  curve = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if record['split'] == 'eval':
        curve[record['step']] = record['nats_per_char']
  return curve


def first_step_below(curve: dict[int, float], reference: dict[int, float],
                     after: int) -> int | None:
  """The first evaluation step > `after` at which `curve` is below `reference`."""
  return next((s for s in sorted(curve) if s > after and s in reference
               and curve[s] < reference[s]), None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='experiments/configs/upcycle_tiny.py')
  parser.add_argument('--at', type=int, default=300, help='dense step to upcycle from')
  parser.add_argument('--noise_std', type=float, default=0.0)
  parser.add_argument('--out', default='runs/upcycle')
  args = parser.parse_args()
  workdirs = {name: os.path.join(args.out, name) for name in ('dense', 'scratch', 'upcycled')}
  for name, workdir in workdirs.items():
    config = config_from_file(args.config)
    if name == 'dense':
      config.model.update(dense_baseline=True, num_selected_experts=1)
    if name == 'upcycled':
      config.upcycle.update(from_workdir=workdirs['dense'], step=args.at,
                            noise_std=args.noise_std)
    print(f'--- {name} ---', flush=True)
    summary = loop.train(config, workdir)
    print(loop.format_summary(summary), flush=True)

  curves = {name: eval_curve(workdir) for name, workdir in workdirs.items()}
  steps = sorted(curves['dense'])
  print(f'\nvalidation nats/char (upcycled from dense step {args.at})')
  print('step   dense  scratch  upcycled')
  for s in steps:
    row = [curves[name].get(s) for name in workdirs]
    print(f'{s:>4} ' + ' '.join(f'{v:8.4f}' if v is not None else '       -' for v in row))
  results = {'config': args.config, 'upcycled_at': args.at, 'noise_std': args.noise_std,
             'curves': curves}
  for name in ('scratch', 'upcycled'):
    step = first_step_below(curves[name], curves['dense'], args.at)
    results[f'{name}_first_below_dense_after_{args.at}'] = step
    print(f'{name}: first below the dense run after step {args.at}: '
          f'{step if step is not None else "never"}')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
