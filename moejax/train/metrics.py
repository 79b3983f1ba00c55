"""The metric writers: metrics.jsonl and TensorBoard event files, written synchronously.

Both are written in the training loop's own thread and flushed at each write, so a failing disk
raises `MetricsWriteError` at once (naming the file) instead of killing a writer thread and
leaving the loop blocked on its queue.

metrics.jsonl is append-only, so a crash (kill -9, a full disk) can leave its last line torn;
the next writer starts on a new line after it, and `read_metrics` skips torn lines wherever
they are, with a warning.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np


class MetricsWriteError(OSError):
  """A metrics file could not be written (disk full, permissions, ...)."""


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Flatten vector metrics (expert usage [E]) into '<name>/<i>' scalars."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      out[name] = float(value)
    else:
      out.update({f'{name}/{i}': float(v) for i, v in enumerate(value.ravel())})
  return out


@contextlib.contextmanager
def _reporting(path: str):
  """Turn an OSError inside into a MetricsWriteError naming `path`."""
  try:
    yield
  except MetricsWriteError:
    raise
  except OSError as error:
    raise MetricsWriteError(error.errno, f'cannot write metrics to {path}: '
                            f'{error.strerror or error}') from error


class MetricWriter:
  """Appends {'step', 'split', metrics...} lines to <workdir>/metrics.jsonl and writes the same
  scalars as TensorBoard event files under <workdir>/tensorboard (tensorboardX's record format,
  no TensorFlow, no background thread)."""

  def __init__(self, workdir: str):
    from tensorboardX.event_file_writer import EventsWriter
    self._jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self._tensorboard = os.path.join(workdir, 'tensorboard')
    with _reporting(self._jsonl_path):
      self._jsonl = open(self._jsonl_path, 'a')
      if _ends_torn(self._jsonl_path):
        self._jsonl.write('\n')  # after a torn last line (a crash), not on it
    with _reporting(self._tensorboard):
      os.makedirs(self._tensorboard, exist_ok=True)
      self._tb = EventsWriter(os.path.join(self._tensorboard, 'events'))

  def write(self, step: int, split: str, metrics: Mapping[str, Any]):
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar
    line = {'step': step, 'split': split}
    for name, value in metrics.items():
      value = np.asarray(value)
      line[name] = value.item() if value.ndim == 0 else value.tolist()
    with _reporting(self._jsonl_path):
      self._jsonl.write(json.dumps(line) + '\n')
      self._jsonl.flush()
    with _reporting(self._tensorboard):
      for name, value in _scalars(metrics).items():
        self._tb.write_event(Event(wall_time=time.time(), step=step,
                                   summary=scalar(f'{split}/{name}', value)))
      self._tb.flush()

  def close(self):
    """Close both files; errors on closing are ignored (the run's outcome is decided)."""
    for file in (self._jsonl, self._tb):
      try:
        file.close()
      except OSError:
        pass


def _ends_torn(path: str) -> bool:
  """Whether the file is non-empty and its last byte is not a newline."""
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b'\n'


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl, in file order. Torn lines (a crash mid-write; a resumed run
  appends after them, so they may be anywhere) are skipped, with one warning naming the file and
  their line numbers. Every reader of metrics.jsonl reads it here."""
  with open(path) as f:
    lines = f.read().split('\n')
  rows, torn = [], []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if isinstance(row, dict):
      rows.append(row)
    else:
      torn.append(str(number))
  if torn:
    warnings.warn(f'{path}: skipping torn line{"s" * (len(torn) > 1)} {", ".join(torn)} '
                  '(cut short by a crash while writing)', stacklevel=2)
  return rows


class NullWriter:
  """What processes other than the first write: nothing (process 0 writes the run's metrics)."""

  def write(self, step: int, split: str, metrics: Mapping[str, Any]):
    del step, split, metrics

  def close(self):
    pass
