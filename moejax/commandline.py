"""What every moejax command shares: --config.<path>=VALUE overrides, --debug, and one place
that turns the errors a user can act on into one line and an exit status."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

OVERRIDE = '--config.'


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(the other arguments, [(field path, value text)]) from --config.<path>=VALUE (or
  --config.<path> VALUE) arguments."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(OVERRIDE):
      path, sep, value = arg[len(OVERRIDE):].partition('=')
      if not sep:
        if i + 1 == len(argv):
          raise SystemExit(f'moejax: {arg} needs a value ({arg}=VALUE)')
        value, i = argv[i + 1], i + 1
      overrides.append((path, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def check_directory(path: str, flag: str) -> None:
  """Refuse a directory argument (a work, output, runs or results directory) that cannot be
  one because `path`, or the nearest existing entry above it, is not a directory: an InputError
  naming it, before any work (not a FileExistsError when it is made)."""
  from moejax.errors import InputError
  found = os.path.abspath(path)
  while not os.path.lexists(found):
    found = os.path.dirname(found)
  if os.path.isdir(found):
    return
  what = 'a file' if os.path.isfile(found) else 'not a directory'
  if found == os.path.abspath(path):
    raise InputError(f'{flag} {path} is {what}; it must be a directory')
  raise InputError(f'{flag} {path} cannot be made: {found} is {what}')


def debug_requested(args: argparse.Namespace) -> bool:
  """--debug, or MOEJAX_DEBUG set (not to 0): show tracebacks instead of one-line errors."""
  return args.debug or os.environ.get('MOEJAX_DEBUG', '') not in ('', '0')


def reporting_errors(command: str, action: Callable[[], int | None], debug: bool,
                     usage_errors: tuple[type[Exception], ...] = ()) -> int | None:
  """`action()`'s exit status, or the status of an error a user can act on, printed as one line
  'moejax COMMAND: ...': 2 for a bad setting, a path or file that cannot be used, a checkpoint
  that does not fit the config (or one of `usage_errors`); 1 for a damaged or missing checkpoint,
  a work-directory lock or a metrics-writing failure. Anything else is a bug: its traceback
  shows. With `debug` they all raise."""
  from moejax.errors import ConfigError, InputError
  from moejax.train.checkpoint import CheckpointError, IncompatibleCheckpointError
  from moejax.train.lock import WorkdirLocked
  from moejax.train.metrics import MetricsWriteError
  try:
    return action()
  except (ConfigError, InputError, IncompatibleCheckpointError, FileNotFoundError,
          NotADirectoryError, IsADirectoryError, *usage_errors) as error:
    if debug:
      raise
    print(f'moejax {command}: {error}', file=sys.stderr)
    return 2
  except (CheckpointError, WorkdirLocked, MetricsWriteError) as error:
    if debug:
      raise
    print(f'moejax {command}: {error}', file=sys.stderr)
    return 1
