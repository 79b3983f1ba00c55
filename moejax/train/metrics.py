"""Per-layer routing metrics from the `intermediates` collection, and the metric writers."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

PER_LAYER = ('expert_usage', 'fraction_dropped', 'router_z_loss')


def per_layer_metrics(intermediates: Any) -> dict[str, jax.Array]:
  """{'<metric>/<layer>': value} for every MoE layer: e.g. 'expert_usage/decoder/unit_0/block_1'
  -> [E]. Scanned stacks (param path '.../units/...', values with a leading unit axis) are
  unstacked into 'unit_<i>' so a layer has the same name with and without nn.scan."""
  out = {}
  for path, values in traverse_util.flatten_dict(intermediates).items():
    name = path[-1]
    if name not in PER_LAYER:
      continue
    (value,) = values  # one call per layer and step
    layer = [p for p in path[:-1] if p not in ('intermediates', 'moe')]
    if 'units' in layer:
      i = layer.index('units')
      for u in range(value.shape[0]):
        out['/'.join([name, *layer[:i], f'unit_{u}', *layer[i + 1:]])] = value[u]
    else:
      out['/'.join([name, *layer])] = value
  return out


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
