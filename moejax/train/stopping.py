"""Stopping a run cleanly, on every process at the same step.

`stop_requests()` turns SIGTERM / SIGINT into a request that the loop reads between steps and an
evaluation between batches; a metrics-writing failure is kept in the same request. `agreed_stop`
is one small all-gather with several processes: when any process was signalled (a preempted
host) or failed to write, all stop at the same point, so every collective save and barrier
after it is met by all of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


@dataclasses.dataclass
class StopRequest:
  """What this process was asked or forced to stop for: a signal's name, or the exception of a
  failed metrics write (kept until the state is saved)."""
  signal: str | None = None
  failure: Exception | None = None


@dataclasses.dataclass(frozen=True)
class Stop:
  """A stop agreed by every process: `signal` ('SIGTERM', 'SIGTERM (on another process)'), or
  `failed` (a metrics write failed on some process)."""
  signal: str | None = None
  failed: bool = False

  def __bool__(self) -> bool:
    return self.failed or self.signal is not None


def agreed_stop(request: StopRequest) -> Stop:
  """The stop every process agrees on (falsy when none asked)."""
  local = np.array([request.signal is not None, request.failure is not None], np.int32)
  if jax.process_count() > 1:
    local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).max(axis=0)
  signalled, failed = bool(local[0]), bool(local[1])
  name = (request.signal or 'SIGTERM (on another process)') if signalled else None
  return Stop(name, failed)


@contextlib.contextmanager
def stop_requests():
  """While active, SIGTERM / SIGINT set `request.signal` instead of killing the process, so the
  loop can finish its step and save; a second SIGINT interrupts at once."""
  request = StopRequest()

  def handler(signum, frame):
    if request.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    request.signal = signal.Signals(signum).name

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield request
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
