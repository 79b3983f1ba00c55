"""`moejax ablate SWEEP`: run a sweep (or rebuild its report) from the command line."""
from __future__ import annotations

import argparse
import os
import sys

from moejax.ablate.sweep import (SCALES, SWEEPS_DIR, SweepError, load_sweep, run_specs,
                                 sweep_names)
from moejax.commandline import (check_directory, debug_requested, reporting_errors,
                                split_overrides)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='moejax ablate',
      description='Run an ablation sweep (experiments/ablations/<name>.py): train each run '
                  'and seed in its own work directory, skip runs finished there or committed to '
                  '<results_dir>/<name>.csv, resume a stopped one, add each finished run to '
                  '<name>.csv and <name>_curves.csv, and rebuild <name>.md and .png and the '
                  'page of verdicts (verdicts.md, verdicts.png) from the committed files.',
      epilog='Set any config field of every run with --config.<section>.<field>=VALUE, e.g. '
             '--config.train.num_steps=20 for a quick try (in another --runs_dir and '
             '--results_dir: a run finished or committed with another config is an error). '
             'Sweeps: '
             + (', '.join(sweep_names()) or 'none'))
  parser.add_argument('sweep', metavar='SWEEP',
                      help=f"a sweep name ({SWEEPS_DIR}/SWEEP.py), a sweep file, or 'all' (every "
                           'sweep there, in turn)')
  parser.add_argument('--report', action='store_true',
                      help='rebuild the md/png and the verdicts from the committed csv files '
                           '(and the finished runs in --runs_dir), training nothing')
  parser.add_argument('--scale', choices=tuple(SCALES), default='small',
                      help="'small': sized for a 2-core CPU; 'base': the Switch-Base-shaped "
                           'variant (T5-Base shapes, C4), for TPUs')
  parser.add_argument('--runs_dir', default=os.path.join('runs', 'ablations'),
                      help='where the runs live: RUNS_DIR/SWEEP[_base]/RUN/seedS')
  parser.add_argument('--results_dir', default=os.path.join('experiments', 'results'),
                      help='where the committed csv files are, and the md/png go')
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


def committed_keys(sweep, specs: list, results_dir: str, stem: str) -> set[str]:
  """Keys of the runs of `specs` that <results_dir>/<stem>.csv holds (every EVALS variant, the
  same config); a committed run with another config is a SweepError."""
  from moejax.ablate import committed
  path = committed.paths(results_dir, stem)['rows']
  rows = {}
  for row in committed.read_csv(path):
    rows.setdefault((row['run'], row['seed']), []).append(row)
  done = set()
  for spec in specs:
    found = rows.get((spec.name, spec.seed), [])
    wanted = committed.config_hash(spec.config)
    if any(row.get('config_hash') != wanted for row in found):
      raise SweepError(f'{path} holds {spec.key} run with another config (hash '
                       f'{found[0].get("config_hash")}, now {wanted}): delete its rows (and '
                       'curves) to run it again, or give another --results_dir')
    if found and {row.get('eval') for row in found} >= set(sweep.evals or [None]):
      done.add(spec.key)
  return done


def _suffix(scale: str) -> str:
  """The file stems' suffix at this scale: '' at the CPU scale, '_base' at the base one."""
  return '' if scale == 'small' else f'_{scale}'


def ablate(name: str, args: argparse.Namespace, overrides: list[tuple[str, str]],
           page_too: bool = True) -> int | None:
  """Run one sweep (or rebuild its report) as `args` say; the exit status (None: stopped).
  Without `page_too` its last report leaves the page of verdicts to the caller ('all')."""
  from moejax.ablate import report, runner
  check_directory(args.runs_dir, '--runs_dir')
  check_directory(args.results_dir, '--results_dir')
  sweep = load_sweep(name)
  specs = run_specs(sweep, args.scale, overrides)
  suffix = _suffix(args.scale)
  sweep_dir = os.path.join(args.runs_dir, sweep.name + suffix)
  done = committed_keys(sweep, specs, args.results_dir, sweep.name + suffix)
  write = lambda results, with_page=True: report.write_reports(  # each finished run: the page too
      sweep, specs, results, args.results_dir, args.scale, suffix, with_page)
  if not args.report:
    _compilation_cache(args.runs_dir)
    if not runner.run_sweep(sweep, specs, sweep_dir, args.quiet, done,
                            on_result=lambda result: write([result])):
      print(f'sweep {sweep.name} stopped; finished runs are kept in {sweep_dir} and '
            f'{args.results_dir}. Run the same command again to resume.')
      return None
  results = [r for r in (runner.load_result(runner.run_dir(sweep_dir, s)) for s in specs) if r]
  if not results and not done:  # with 'all', the page is still written by the others
    print(f'moejax ablate: no finished run of {sweep.name} in {sweep_dir} or '
          f'{args.results_dir}', file=sys.stderr)
    return 0 if args.sweep == 'all' else 1
  paths = write(results, page_too)
  finished = len(done | {f'{r["name"]}/seed{r["seed"]}' for r in results})
  print(f'{finished} of {len(specs)} runs of {sweep.name} finished; wrote ' + ', '.join(paths))
  return 0


def main(argv: list[str]) -> int:
  """`moejax ablate` with `argv` the arguments after 'ablate'; returns the exit status."""
  rest, overrides = split_overrides(argv)
  args = _parser().parse_args(rest)
  every = args.sweep == 'all'
  for name in sweep_names() if every else [args.sweep]:
    status = reporting_errors('ablate', lambda: ablate(name, args, overrides, not every),
                              debug_requested(args), usage_errors=(SweepError,))
    if status is None:  # stopped by a signal: the next command resumes
      return 0
    if status:
      return status
  if every:  # the page once, from every sweep's committed files
    from moejax.ablate import report
    paths = report.write_page(args.results_dir, _suffix(args.scale))
    print('wrote ' + ', '.join(paths))
  return 0
