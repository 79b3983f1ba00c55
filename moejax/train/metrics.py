"""The metric writers: metrics.jsonl and TensorBoard event files."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


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


class MetricWriter:
  """Appends {'step', 'split', metrics...} lines to <workdir>/metrics.jsonl and writes the same
  scalars as TensorBoard event files under <workdir>/tensorboard (tensorboardX, no TensorFlow)."""

  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, split: str, metrics: Mapping[str, Any]):
    line = {'step': step, 'split': split}
    for name, value in metrics.items():
      value = np.asarray(value)
      line[name] = value.item() if value.ndim == 0 else value.tolist()
    self._jsonl.write(json.dumps(line) + '\n')
    self._jsonl.flush()
    for name, value in _scalars(metrics).items():
      self._tb.add_scalar(f'{split}/{name}', value, step)

  def close(self):
    self._jsonl.close()
    self._tb.close()
