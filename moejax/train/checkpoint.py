"""Orbax checkpoints of the whole run: train state (params, optimizer state, step, rng, non-finite
counters), the data position, and the model config (to explain a shape mismatch on resume).

Restoring reads every array straight onto the shardings of a template state, so a checkpoint
saved on one device restores onto any mesh (experts split over 'expert', say).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from moejax.models import ModelConfig


class ShapeMismatchError(ValueError):
  """The checkpoint's arrays do not fit the configured model."""


def _shapes(tree: Any) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_compatible(saved_model: dict, model: ModelConfig, saved_shapes: dict,
                     shapes: dict) -> None:
  """Raise ShapeMismatchError naming the differing model fields if the param shapes differ."""
  if saved_shapes == shapes:
    return
  current = model.to_dict()
  fields = sorted(k for k in set(saved_model) | set(current)
                  if saved_model.get(k) != current.get(k))
  changes = ', '.join(f'model.{k}: {saved_model.get(k)!r} -> {current.get(k)!r}' for k in fields)
  arrays = sorted(k for k in set(saved_shapes) | set(shapes)
                  if saved_shapes.get(k) != shapes.get(k))
  raise ShapeMismatchError(
      f'the checkpoint does not fit this model; differing config fields: {changes or "none"}. '
      f'Arrays that differ ({len(arrays)}): '
      + ', '.join(f'{k} {saved_shapes.get(k)} -> {shapes.get(k)}' for k in arrays[:5])
      + ('...' if len(arrays) > 5 else '') + '. Use another --workdir, or the saved config.')


class Checkpoints:
  """CheckpointManager over <directory>: save every `every_steps` (and when forced), keep `keep`."""

  def __init__(self, directory: str, every_steps: int, keep: int):
    options = ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=keep,
                                           create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, data_position: int, model: ModelConfig, force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return False
    meta = {'data_position': data_position, 'model': model.to_dict(),
            'param_shapes': {k: list(v) for k, v in _shapes(state.params).items()}}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, template, model: ModelConfig, step: int | None = None):
    """(state on the template's shardings, data position) of `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    saved_shapes = {k: tuple(v) for k, v in meta['param_shapes'].items()}
    check_compatible(meta['model'], model, saved_shapes, _shapes(template.params))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored['state'], meta['data_position']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
