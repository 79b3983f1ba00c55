"""Orbax checkpoints of the whole run: train state (params, optimizer state, step, rng, non-finite
counters), the data iterator's state, the signature of the state (every array's path, dtype and
shape) and the config fields that shape it.

Compatibility: before Orbax reads a step, its saved signature is compared with the state this
run would build; when they differ (another optimizer, `model.num_experts`, `model.ffn_dim`, ...),
`IncompatibleCheckpointError` names the changed fields and nothing on disk changes.

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

import dataclasses
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

from moejax.distributed import broadcast_json

MANIFEST = 'moejax_checksums.json'


class IncompatibleCheckpointError(ValueError):
  """A complete checkpoint whose state does not fit the configured run (another optimizer, other
  shapes or dtypes): a setting changed, nothing is damaged, nothing is moved."""


class CheckpointError(RuntimeError):
  """No usable checkpoint: the one asked for is missing or damaged, or every one is."""


class CheckpointWarning(UserWarning):
  """A checkpoint step was skipped (damaged, partial or empty)."""


def _empty(node: Any) -> bool:
  return node is None or (isinstance(node, (tuple, list, dict)) and not node)


def state_signature(state: Any) -> dict[str, str]:
  """{path: 'dtype[shape]'} of every array of a state (or of any tree), and {path: 'empty'} of
  every empty node (an optimizer's stateless step): what a checkpoint must match to restore
  into it."""
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_empty)[0]
  return {jax.tree_util.keystr(path): 'empty' if _empty(leaf) else
          f'{jax.numpy.dtype(leaf.dtype).name}{list(leaf.shape)}' for path, leaf in flat}


def check_compatible(saved: dict, fields: dict, signature: dict[str, str], where: str) -> None:
  """IncompatibleCheckpointError, one line, when the saved state's signature (`saved`: the
  step's metadata) differs from `signature`: the config fields that differ (`fields`: those that shape the state, saved beside
  it), then the first arrays that differ."""
  saved_signature = saved.get('state_signature')
  if saved_signature is None or saved_signature == signature:
    return
  saved_fields = saved.get('fields', {})
  changed = [f'{k}: {saved_fields.get(k)!r} (saved) -> {fields.get(k)!r} (now)'
             for k in sorted(set(saved_fields) | set(fields))
             if saved_fields.get(k) != fields.get(k)]
  arrays = sorted(k for k in set(saved_signature) | set(signature)
                  if saved_signature.get(k) != signature.get(k))
  shown = ', '.join(f'{k} {saved_signature.get(k, "absent")} -> {signature.get(k, "absent")}'
                    for k in arrays[:3])
  raise IncompatibleCheckpointError(
      f'the checkpoint {where} does not fit this config; differing fields: '
      f'{"; ".join(changed) or "none named"}. {len(arrays)} state entries differ ({shown}'
      f'{", ..." if len(arrays) > 3 else ""}). Nothing was changed: resume with the saved '
      'settings, train in another --workdir, or start afresh with --restart')


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
    try:
      if _sha256(file) != digest:
        return f'checksum mismatch in {name}'
    except OSError as error:
      return f'unreadable file {name} ({error.strerror or error})'
  return None


class Checkpoints:
  """CheckpointManager over <directory>: save every `every_steps` (and when forced), keep `keep`;
  each save is finished and sealed with its checksum manifest before `save` returns.

  `fields`: the config fields that shape the train state ({'model.num_experts': 4,
  'train.optimizer': 'adamw', ...}), saved beside it so that a checkpoint that does not fit is
  explained by the settings that changed. With several processes, process 0 verifies the
  checksums and every process takes its verdict.
  """

  def __init__(self, directory: str, every_steps: int, keep: int, fields: dict | None = None):
    self.directory = os.path.abspath(directory)
    self.fields = dict(fields or {})
    options = ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=keep,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def set_aside_directory(self) -> str:
    return os.path.join(os.path.dirname(self.directory), 'set_aside_checkpoints')

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

  def problems(self) -> dict[int, str | None]:
    """{step: why it is not a complete checkpoint, or None}, in step order; decided on process 0
    (hashing every file once per job) and agreed by all."""
    problems = {}
    if jax.process_index() == 0:
      sealed = self._sealed()
      for step, directory in self.step_dirs().items():
        if sealed:
          problems[step] = step_problem(directory)
        else:
          problems[step] = None if _files(directory) else 'empty'
    if jax.process_count() > 1:
      problems = {int(k): v for k, v in broadcast_json(problems).items()}
    return problems

  def problem(self, step: int) -> str | None:
    return self.problems().get(step, 'no such step')

  def latest_step(self) -> int | None:
    """The newest complete step (None when there is none)."""
    complete = _complete(self.problems())
    return complete[-1] if complete else None

  def save(self, state, data_state: dict, force: bool = False) -> bool:
    """Save `state` and `data_state` (the training batches' iterator state, JSON) at the
    state's step, when it is a step to save (or `force`); whether it saved."""
    step = int(jax.device_get(state.step))
    if step in self.step_dirs():
      return False
    meta = {'data_state': data_state, 'fields': self.fields,
            'state_signature': state_signature(state)}
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    if saved:
      self.manager.wait_until_finished()
      if jax.process_index() == 0:
        write_manifest(os.path.join(self.directory, str(step)))
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'moejax sealed step {step}')
    return saved

  def set_aside(self, step: int, reason: str, move: bool) -> None:
    """Warn that `step` is skipped and why; with `move`, move it to ../set_aside_checkpoints/
    (so that training saves that step again)."""
    directory = self.step_dirs()[step]
    where = ''
    if move:
      target = os.path.join(self.set_aside_directory,
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

  def restore(self, template, step: int | None = None, quarantine: bool = False,
              only: tuple[str, ...] | None = None):
    """(state on the template's shardings, data iterator state) of `step`, or of the newest
    complete step (warning about, and with `quarantine` moving aside, each newer damaged one; with
    `quarantine` and `step`, the steps after it are moved aside too: training goes on from it).
    `template`: a state, or its shapes, dtypes and shardings (`jax.ShapeDtypeStruct`s). `only`:
    the state's fields to read (e.g. ('params', 'step')); the others are left as
    `orbax.checkpoint.PLACEHOLDER` and never reach the devices.

    Only damage (a checksum that does not match, a missing, unreadable or half-written file) sets
    a step aside, and only once a step before it has restored. A complete step that does not
    fit `template` raises IncompatibleCheckpointError and moves nothing; CheckpointError when
    `step` is missing or damaged, or when no step is usable.
    """
    problems = self.problems()
    if step is not None:
      if step not in problems:
        raise CheckpointError(f'no checkpoint at step {step} in {self.directory}; saved steps: '
                              f'{list(problems) or "none"}')
      if problems[step]:
        raise CheckpointError(f'checkpoint step {step} in {self.directory} is damaged: '
                              f'{problems[step]}; complete steps: {_complete(problems)}')
      restored = self._restore(step, template, only)
      for later in [s for s in problems if s > step] if quarantine else []:
        self.set_aside(later, f'training resumes from step {step}', move=True)
      return restored
    if not self._sealed() and problems:
      warnings.warn(f'the checkpoints in {self.directory} predate checksum manifests: '
                    'restoring without verifying them', CheckpointWarning, stacklevel=2)
    complete = _complete(problems)
    if not complete:
      for damaged in reversed(problems):
        self.set_aside(damaged, problems[damaged], quarantine)
      raise CheckpointError(f'no usable checkpoint in {self.directory} (steps tried: '
                            f'{list(problems) or "none"})' + (
                                f'; the damaged steps are in {self.set_aside_directory}'
                                if quarantine and problems else ''))
    restored = self._restore(complete[-1], template, only)
    for damaged in [s for s in reversed(problems) if s > complete[-1]]:
      self.set_aside(damaged, problems[damaged], quarantine)
    return restored

  def _restore(self, step: int, template, only: tuple[str, ...] | None = None):
    """Step `step` (verified complete) restored into `template`'s shapes and shardings (the
    fields in `only`, or all)."""
    if self.manager.all_steps() != list(self.step_dirs()):
      self.manager.reload()
    where = f'at step {step} in {self.directory}'
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    check_compatible(meta, self.fields, state_signature(template), where)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    if only is None:
      args = ocp.args.StandardRestore(abstract)
    else:
      abstract = abstract.replace(**{f.name: jax.tree.map(lambda _: ocp.PLACEHOLDER,
                                                          getattr(abstract, f.name))
                                     for f in dataclasses.fields(abstract) if f.name not in only})
      restore_args = jax.tree.map(
          lambda x: x if x is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(sharding=x.sharding),
          abstract)
      args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
    except Exception as error:  # its files match their checksums: not damage, do not move it
      raise CheckpointError(f'the checkpoint {where} passed its checksums but could not be '
                            f'restored ({type(error).__name__}: {str(error)[:300]}); nothing '
                            'was moved') from error
    # Checkpoints written before the grain pipeline saved the number of batches read instead.
    data_state = meta.get('data_state', {'next_index': meta.get('data_position', 0)})
    return restored['state'], data_state

  def close(self):
    self.manager.close()


def _complete(problems: dict[int, str | None]) -> list[int]:
  return [s for s, problem in problems.items() if problem is None]
