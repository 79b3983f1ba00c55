"""One training run per work directory: `moejax train` holds <workdir>/train.lock while it runs.

The lock is the kernel's (`fcntl.flock`), so it is released whenever its holder ends, even by
kill -9; the file also records the holder (pid, host, start time) for the message a second run
gets. A record left by a holder that ended without clearing it is taken over with a warning. A
job of several processes holds it once, on process 0, and all agree on the outcome.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import warnings

import jax

from moejax.distributed import broadcast_json

LOCK_FILE = 'train.lock'


class WorkdirLocked(RuntimeError):
  """Another process is training in this work directory."""


class StaleLockWarning(UserWarning):
  """The previous holder of the lock ended without releasing it."""


def _holder(text: str) -> str:
  try:
    holder = json.loads(text)
    return f'pid {holder["pid"]} on host {holder["host"]}, since {holder["since"]}'
  except (ValueError, KeyError, TypeError):
    return 'an unknown process'


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Hold the work directory's lock for the duration of the `with` block, or raise
  WorkdirLocked naming its holder. With several processes, process 0 takes the lock and every
  process raises the same WorkdirLocked when it could not."""
  if jax.process_count() == 1:
    with _held(workdir):
      yield
    return
  refusal, held = None, contextlib.ExitStack()
  if jax.process_index() == 0:
    try:
      held.enter_context(_held(workdir))
    except WorkdirLocked as error:
      refusal = str(error)
  refusal = broadcast_json(refusal)
  if refusal is not None:
    raise WorkdirLocked(refusal)
  with held:
    yield


@contextlib.contextmanager
def _held(workdir: str):
  """The kernel's lock on <workdir>/train.lock, with this process recorded as its holder."""
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    with open(path) as f:
      holder = _holder(f.read())
    os.close(fd)
    raise WorkdirLocked(f'{workdir} is in use by another `moejax train` ({holder}); wait for '
                        'it to finish, or train in another --workdir') from None
  with os.fdopen(fd, 'r+') as file:
    previous = file.read()
    if previous.strip():
      warnings.warn(f'taking over the lock of {workdir} from {_holder(previous)}, which ended '
                    'without releasing it', StaleLockWarning, stacklevel=3)
    file.seek(0)
    file.truncate()
    file.write(json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                           'since': time.strftime('%Y-%m-%d %H:%M:%S')}))
    file.flush()
    try:
      yield
    finally:
      file.seek(0)
      file.truncate()
      file.flush()
      fcntl.flock(file.fileno(), fcntl.LOCK_UN)
