"""Sparse upcycling vs training the MoE from scratch, against the dense model they are measured by.

  python experiments/upcycle.py [--config experiments/configs/upcycle_tiny.py] [--at 300] \
                                [--seed 0 --out runs/upcycle]

Three runs of the same data, seed and schedule (work directories under --out):
  dense     the dense source (config with dense_baseline=True, num_selected_experts=1), all steps;
  scratch   the MoE from a fresh init, all steps;
  upcycled  the MoE upcycled from the dense run's checkpoint at step --at, then trained to the end
            (same learning-rate schedule and batches as the dense run from there); with
            --noise_std s > 0 the run is upcycled_noise<s>.
A finished run is not trained again. Prints validation loss (nats/char) at every evaluation and,
for each MoE run, the steps it trained before its validation loss was below the dense model it was
upcycled from (the dense run at step --at), and the first step at which it is below the dense run
at the same step; writes <out>/results.json.
"""
import argparse
import json
import os

from moejax.train import config_from_file, loop
from moejax.train.metrics import read_metrics
from moejax.train.summary import format_summary


def eval_curve(workdir: str) -> dict[int, float]:
  """{step: validation nats/char} from a run's metrics.jsonl."""
  return {row['step']: row['nats_per_char']
          for row in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if row['split'] == 'eval'}


def steps_to_reach(curve: dict[int, float], target: float, start: int) -> int | None:
  """Steps after `start` until the first evaluation of `curve` below `target` (None: never)."""
  return next((s - start for s in sorted(curve) if s > start and curve[s] < target), None)


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
  parser.add_argument('--seed', type=int, default=0, help='params, data order, rngs (all runs)')
  parser.add_argument('--out', default='runs/upcycle')
  args = parser.parse_args()
  upcycled = 'upcycled' + (f'_noise{args.noise_std:g}' if args.noise_std else '')
  workdirs = {name: os.path.join(args.out, name) for name in ('dense', 'scratch', upcycled)}
  for name, workdir in workdirs.items():
    config = config_from_file(args.config)
    config.seed = args.seed
    if name == 'dense':
      config.model.update(dense_baseline=True, num_selected_experts=1)
    if name == upcycled:
      config.upcycle.update(from_workdir=workdirs['dense'], step=args.at,
                            noise_std=args.noise_std)
    if os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and (
        config.train.num_steps in eval_curve(workdir)):
      print(f'--- {name}: finished ({workdir}) ---')
      continue
    print(f'--- {name} ---', flush=True)
    summary = loop.train(config, workdir)
    print(format_summary(summary), flush=True)

  curves = {name: eval_curve(workdir) for name, workdir in workdirs.items()}
  steps = sorted(curves['dense'])
  print(f'\nvalidation nats/char (upcycled from dense step {args.at})')
  print('step   dense  scratch  upcycled')
  for s in steps:
    row = [curves[name].get(s) for name in workdirs]
    print(f'{s:>4} ' + ' '.join(f'{v:8.4f}' if v is not None else '       -' for v in row))
  results = {'config': args.config, 'seed': args.seed, 'upcycled_at': args.at,
             'noise_std': args.noise_std,
             'curves': curves}
  source_loss = curves['dense'][args.at]
  for name, start in (('scratch', 0), (upcycled, args.at)):
    steps = steps_to_reach(curves[name], source_loss, start)
    below = first_step_below(curves[name], curves['dense'], start)
    results[name] = {'moe_steps_to_pass_dense_source': steps,
                     'first_step_below_dense_run': below, 'final': curves[name][max(curves[name])]}
    print(f'{name}: below the dense source ({source_loss:.4f}) after {steps} MoE steps (first '
          f'evaluation under it); below the dense run at the same step from step {below}')
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
