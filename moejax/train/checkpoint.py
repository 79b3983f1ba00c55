"""Orbax checkpoints of the whole run: train state (params, optimizer state, step, rng, non-finite
counters), the data position, and the model config (to explain a shape mismatch on resume).

Restoring reads every array straight onto the shardings of a template state, so a checkpoint
saved on one device restores onto any mesh (experts split over 'expert', say).

Integrity: once Orbax has finished a save, a manifest of every file's SHA-256 is written into the
step's directory (atomically, last). A step is complete when its manifest exists and every file
matches it. Restoring without a step takes the newest complete step, warning about each newer
step that is damaged (a flipped byte, a truncated or missing file), partial (no manifest) or
empty; training moves those aside (to <workdir>/set_aside_checkpoints/) so the run saves them
again. Resuming from an earlier step on purpose (`moejax train --step N`) sets the later steps
aside the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moejax.models import ModelConfig

MANIFEST = 'moejax_checksums.json'


class ShapeMismatchError(ValueError):
  """The checkpoint's arrays do not fit the configured model."""


class CheckpointError(RuntimeError):
  """No usable checkpoint: the one asked for is missing or damaged, or every one is."""


class CheckpointWarning(UserWarning):
  """A checkpoint step was skipped (damaged, partial or empty)."""


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


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _files(directory: str) -> list[str]:
  """Every file under `directory`, relative to it, sorted; the manifest left out."""
  found = []
  for root, _, names in os.walk(directory):
    found += [os.path.relpath(os.path.join(root, n), directory) for n in names]
  return sorted(f for f in found if f != MANIFEST)


def write_manifest(step_dir: str) -> None:
  """Record every file's SHA-256 in <step_dir>/moejax_checksums.json (written last, atomically)."""
  manifest = {name: _sha256(os.path.join(step_dir, name)) for name in _files(step_dir)}
  temporary = os.path.join(step_dir, MANIFEST + '.tmp')
  with open(temporary, 'w') as f:
    json.dump(manifest, f, indent=0)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, os.path.join(step_dir, MANIFEST))


def step_problem(step_dir: str) -> str | None:
  """Why a step directory is not a complete checkpoint (None when it is)."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return 'empty' if not _files(step_dir) else 'partial: no checksum manifest (interrupted save?)'
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as error:
    return f'unreadable checksum manifest ({error})'
  for name, digest in manifest.items():
    file = os.path.join(step_dir, name)
    if not os.path.exists(file):
      return f'missing file {name}'
    if _sha256(file) != digest:
      return f'checksum mismatch in {name}'
  return None


class Checkpoints:
  """CheckpointManager over <directory>: save every `every_steps` (and when forced), keep `keep`;
  each save is finished and sealed with its checksum manifest before `save` returns."""

  def __init__(self, directory: str, every_steps: int, keep: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=keep,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def step_dirs(self) -> dict[int, str]:
    """{step: directory} of every step directory, complete or not, in step order."""
    steps = {}
    if os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if name.isdigit() and os.path.isdir(os.path.join(self.directory, name)):
          steps[int(name)] = os.path.join(self.directory, name)
    return dict(sorted(steps.items()))

  def _sealed(self) -> bool:
    """Whether this run writes manifests (False: every step predates them; not verified)."""
    return any(os.path.exists(os.path.join(d, MANIFEST)) for d in self.step_dirs().values())

  def problem(self, step: int) -> str | None:
    directory = self.step_dirs().get(step)
    if directory is None:
      return 'no such step'
    if not self._sealed():
      return None if _files(directory) else 'empty'
    return step_problem(directory)

  def latest_step(self) -> int | None:
    """The newest complete step (None when there is none)."""
    return next((s for s in reversed(self.step_dirs()) if self.problem(s) is None), None)

  def save(self, state, data_position: int, model: ModelConfig, force: bool = False) -> bool:
    step = int(jax.device_get(state.step))
    if step in self.step_dirs():
      return False
    meta = {'data_position': data_position, 'model': model.to_dict(),
            'param_shapes': {k: list(v) for k, v in _shapes(state.params).items()}}
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      self.manager.wait_until_finished()
      if jax.process_index() == 0:
        write_manifest(os.path.join(self.directory, str(step)))
    return saved

  def set_aside(self, step: int, reason: str, move: bool) -> None:
    """Warn that `step` is skipped and why; with `move`, move it to ../set_aside_checkpoints/
    (so that training saves that step again)."""
    directory = self.step_dirs()[step]
    where = ''
    if move:
      target = os.path.join(os.path.dirname(self.directory), 'set_aside_checkpoints',
                            f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(directory, target)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'moejax set aside step {step}')
      self.manager.reload()  # Orbax lists its steps once; it must not think this one exists
      where = f'; moved to {target}'
    warnings.warn(f'checkpoint step {step} in {self.directory} is skipped: {reason}{where}',
                  CheckpointWarning, stacklevel=3)

  def restore(self, template, model: ModelConfig, step: int | None = None,
              quarantine: bool = False):
    """(state on the template's shardings, data position) of `step`, or of the newest complete
    step (warning about, and with `quarantine` moving aside, each newer damaged one; with
    `quarantine` and `step`, the steps after it are moved aside too: training goes on from it).
    Raises CheckpointError when `step` is missing or damaged, or when no step is usable."""
    steps = self.step_dirs()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f'no checkpoint at step {step} in {self.directory}; saved steps: '
                              f'{list(steps) or "none"}')
      problem = self.problem(step)
      if problem:
        raise CheckpointError(f'checkpoint step {step} in {self.directory} is damaged: '
                              f'{problem}; complete steps: {self._complete()}')
      restored = self._restore(step, template, model)
      for later in [s for s in steps if s > step] if quarantine else []:
        self.set_aside(later, f'training resumes from step {step}', move=True)
      return restored
    if not self._sealed() and steps:
      warnings.warn(f'the checkpoints in {self.directory} predate checksum manifests: '
                    'restoring without verifying them', CheckpointWarning, stacklevel=2)
    for candidate in reversed(steps):
      problem = self.problem(candidate)
      if problem is None:
        try:
          return self._restore(candidate, template, model)
        except ShapeMismatchError:
          raise
        except Exception as error:  # unreadable despite its manifest (or an unsealed run)
          problem = f'restore failed: {type(error).__name__}: {error}'
      self.set_aside(candidate, problem, quarantine)
    raise CheckpointError(f'no usable checkpoint in {self.directory} (steps tried: '
                          f'{list(steps) or "none"}); move the directory away to start afresh')

  def _complete(self) -> list[int]:
    return [s for s in self.step_dirs() if self.problem(s) is None]

  def _restore(self, step: int, template, model: ModelConfig):
    if self.manager.all_steps() != list(self.step_dirs()):
      self.manager.reload()
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
