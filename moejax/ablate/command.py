"""`moejax ablate SWEEP`: run a sweep (or rebuild its report) from the command line."""
from __future__ import annotations

import argparse
import os
import sys

from moejax.ablate.sweep import (SCALES, SWEEPS_DIR, SweepError, load_sweep, run_specs,
                                 sweep_names)
from moejax.commandline import debug_requested, reporting_errors, split_overrides


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='moejax ablate',
      description='Run an ablation sweep (experiments/ablations/<name>.py): train each run '
                  'and seed in its own work directory, skip finished runs, resume a stopped one, '
                  'then write <results_dir>/<name>.csv, .md and .png.',
      epilog='Set any config field of every run with --config.<section>.<field>=VALUE, e.g. '
             '--config.train.num_steps=20 for a quick try (in another --runs_dir: a finished '
             'run trained with another config is an error). Sweeps: '
             + (', '.join(sweep_names()) or 'none'))
  parser.add_argument('sweep', metavar='SWEEP',
                      help=f"a sweep name ({SWEEPS_DIR}/SWEEP.py), a sweep file, or 'all' (every "
                           'sweep there, in turn)')
  parser.add_argument('--report', action='store_true',
                      help='rebuild the csv/md/png from the finished runs, training nothing')
  parser.add_argument('--scale', choices=tuple(SCALES), default='small',
                      help="'small': sized for a 2-core CPU; 'base': the Switch-Base-shaped "
                           'variant (T5-Base shapes, C4), for TPUs')
  parser.add_argument('--runs_dir', default=os.path.join('runs', 'ablations'),
                      help='where the runs live: RUNS_DIR/SWEEP[_base]/RUN/seedS')
  parser.add_argument('--results_dir', default=os.path.join('experiments', 'results'),
                      help='where the csv/md/png go')
  parser.add_argument('--quiet', action='store_true', help="no progress bar of each run's steps")
  parser.add_argument('--debug', action='store_true',
                      help='show tracebacks of config errors (also: MOEJAX_DEBUG=1)')
  return parser


def _compilation_cache(runs_dir: str):
  """Keep compiled steps on disk (<runs_dir>/jax_cache), unless a cache directory is already set:
  the other seeds of a config, and a resumed run, load their train and eval steps instead of
  compiling them again (about 15 s a run on the 2-core CPU)."""
  import jax
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(os.path.join(runs_dir,
                                                                                'jax_cache')))


def ablate(name: str, args: argparse.Namespace,
           overrides: list[tuple[str, str]]) -> int | None:
  """Run one sweep (or rebuild its report) as `args` say; the exit status (None: stopped)."""
  from moejax.ablate import report, runner
  sweep = load_sweep(name)
  specs = run_specs(sweep, args.scale, overrides)
  sweep_dir = os.path.join(args.runs_dir, sweep.name + ('' if args.scale == 'small'
                                                        else f'_{args.scale}'))
  if not args.report:
    _compilation_cache(args.runs_dir)
    if not runner.run_sweep(sweep, specs, sweep_dir, args.quiet):
      print(f'sweep {sweep.name} stopped; finished runs are kept in {sweep_dir}. Run the same '
            'command again to resume.')
      return None
  results = [r for r in (runner.load_result(runner.run_dir(sweep_dir, s)) for s in specs) if r]
  if not results:
    print(f'moejax ablate: no finished run of {sweep.name} in {sweep_dir}', file=sys.stderr)
    return 1
  paths = report.write_reports(sweep, results, args.results_dir, args.scale, len(specs),
                               sweep_dir)
  print(f'{len(results)} of {len(specs)} runs of {sweep.name} finished; wrote '
        + ', '.join(paths))
  return 0


def main(argv: list[str]) -> int:
  """`moejax ablate` with `argv` the arguments after 'ablate'; returns the exit status."""
  rest, overrides = split_overrides(argv)
  args = _parser().parse_args(rest)
  status = 0
  for name in sweep_names() if args.sweep == 'all' else [args.sweep]:
    status = reporting_errors('ablate', lambda: ablate(name, args, overrides),
                              debug_requested(args), usage_errors=(SweepError,))
    if status is None:  # stopped by a signal: the next command resumes
      return 0
    if status:
      return status
  return status
