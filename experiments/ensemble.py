"""Ensembles of trained checkpoints: held-out NLL of each combination method vs the best member.

  python experiments/ensemble.py RUN_DIR [RUN_DIR ...] [--out runs/ensemble.json]

Each RUN_DIR is a finished `moejax train` run (its config.json and latest checkpoint); all must
read the same validation data. The validation split's windows are cut in two halves, in order:
the first half fits the ensemble weights (and picks the best single member), the second half is
held out to report on. Methods: `moejax.ensemble.METHODS`.
"""
import argparse
import functools
import json

import jax
import numpy as np

from moejax import ensemble
from moejax.train import saved_config, token_log_probs
from moejax.train.resume import load
from moejax.train.run import open_run


def member_log_probs(workdir: str, parts: list[list]) -> list[np.ndarray]:
  """For each list of batches in `parts`: log p(target) of its real tokens, in order, [N]."""
  run, state = load(saved_config(workdir), workdir)
  log_probs = jax.jit(functools.partial(token_log_probs, model=run.model))
  return [np.concatenate([
      np.asarray(log_probs(state.params, batch, state.balancing_bias_state))[batch['weights'] > 0]
      for batch in batches]).astype(np.float64) for batches in parts]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='+')
  parser.add_argument('--out', default='runs/ensemble.json')
  args = parser.parse_args()
  configs = [saved_config(workdir) for workdir in args.runs]
  data = {(c.data.source, c.data.length, c.data.validation_fraction, c.data.tokenizer)
          for c in configs}
  if len(data) != 1:
    raise SystemExit(f'the runs read different validation data: {sorted(data)}')
  batches = open_run(configs[0], args.runs[0]).eval_batches
  half = len(batches) // 2
  per_member = [member_log_probs(w, [batches[:half], batches[half:]]) for w in args.runs]
  log_probs = {split: np.stack([member[i] for member in per_member])  # Shape: [M, N]
               for i, split in enumerate(('fit', 'test'))}
  member_nll = {split: -lp.mean(axis=1) for split, lp in log_probs.items()}
  best = int(np.argmin(member_nll['fit']))
  results = {'runs': args.runs, 'tokens': {s: lp.shape[1] for s, lp in log_probs.items()},
             'member_test_nll': member_nll['test'].tolist(), 'best_member': args.runs[best],
             'methods': {}}
  print(f'tokens: fit {log_probs["fit"].shape[1]}, test {log_probs["test"].shape[1]}')
  for workdir, fit, test in zip(args.runs, member_nll['fit'], member_nll['test']):
    print(f'member {workdir:<28} fit {fit:.4f}  test {test:.4f} nats/token')
  best_test = member_nll['test'][best]
  print(f'best member on the fit half: {args.runs[best]} (test {best_test:.4f})')
  for method in ensemble.METHODS:
    weights = ensemble.ensemble_weights(method, log_probs['fit'])
    test = ensemble.mixture_nll(log_probs['test'], weights)
    results['methods'][method] = {'weights': weights.tolist(), 'test_nll': test,
                                  'gain_over_best_member': best_test - test}
    print(f'{method:<10} test {test:.4f} (best member - ensemble: {best_test - test:+.4f}); '
          'weights ' + ' '.join(f'{w:.3f}' for w in weights))
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
