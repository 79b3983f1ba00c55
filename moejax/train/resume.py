"""Where a run's state comes from and when it is saved: the newest complete checkpoint, a chosen
step, an upcycled dense run, or a fresh start; never a fresh start by accident.

A work directory whose checkpoints/ is empty while set_aside_checkpoints/ holds steps (every
step was damaged, or set aside by `--step`) is refused: the user restores a step or asks for
`restart`, which moves the old run's files into previous_runs/<time>/ and starts afresh.
"""
from __future__ import annotations

import os
import shutil
import time

import jax
import ml_collections
from jax.experimental import multihost_utils

from moejax.errors import InputError

from moejax.train.checkpoint import CheckpointError
from moejax.train.config import saved_config
from moejax.train.run import Run, open_run
from moejax.upcycle import upcycle_optimizer_state, upcycle_tree

# What `restart` moves out of the way (the lock, the vocabulary and the TFDS data stay).
RUN_FILES = ('checkpoints', 'set_aside_checkpoints', 'metrics.jsonl', 'tensorboard', 'config.json')


def restart(workdir: str) -> str | None:
  """Move the run's files into <workdir>/previous_runs/<time>/ (process 0); where, or None when
  there was nothing to move."""
  present = [name for name in RUN_FILES if os.path.exists(os.path.join(workdir, name))]
  if not present:
    return None
  target = os.path.join(workdir, 'previous_runs', time.strftime('%Y%m%d-%H%M%S'))
  if jax.process_index() == 0:
    os.makedirs(target)
    for name in present:
      shutil.move(os.path.join(workdir, name), os.path.join(target, name))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('moejax restart')
  return target


def check_not_orphaned(run: Run) -> None:
  """CheckpointError when checkpoints/ has no step but set_aside_checkpoints/ has some: starting
  afresh there would silently throw a run away."""
  checkpoints = run.checkpoints
  aside = checkpoints.set_aside_directory
  if checkpoints.step_dirs() or not os.path.isdir(aside) or not os.listdir(aside):
    return
  raise CheckpointError(
      f'{checkpoints.directory} has no checkpoint, but {aside} holds {sorted(os.listdir(aside))}. '
      f'To resume, move a step back (mv {aside}/STEP-TIME {checkpoints.directory}/STEP; its '
      'checksums are checked again); to start afresh and keep the old files, pass --restart')


def upcycled_state(run: Run):
  """(state, data iterator state) of a run that starts by upcycling the dense run in
  `config.upcycle.from_workdir` at checkpoint `config.upcycle.step` (default: its latest).

  Params and Adam moments come from `moejax.upcycle`; the step, the optimizer's counts (so the
  learning-rate schedule goes on where the dense run was) and the data iterator's state are the
  dense run's, so both runs see the same batches from there (given the same data config, batch size
  and seed: the shuffle is seeded).
  """
  up = run.config.upcycle
  dense_run = open_run(saved_config(up.from_workdir), up.from_workdir)
  dense, data_state = dense_run.checkpoints.restore(dense_run.fresh_state(), up.step)
  dense_run.checkpoints.close()
  fresh = run.fresh_state()
  noise_rng = jax.random.fold_in(jax.random.key(run.config.seed), 1)
  state = fresh.replace(step=dense.step,
                        params=upcycle_tree(dense.params, fresh.params, up.noise_std, noise_rng),
                        opt_state=upcycle_optimizer_state(dense.opt_state, fresh.opt_state,
                                                          fresh.params))
  shardings = run.shardings(state)
  return (state if shardings is None else jax.device_put(state, shardings)), data_state


def restore_or_init(run: Run, step: int | None = None):
  """(state, data iterator state): checkpoint `step`'s (later steps are moved aside), or the newest
  complete checkpoint's (damaged newer steps are moved aside with a warning; CheckpointError when
  none is usable; IncompatibleCheckpointError, moving nothing, when it does not fit the config);
  else, when `config.upcycle.from_workdir` is set, the upcycled dense checkpoint's; else a fresh
  state and None, the first batch (refused while set-aside steps wait: `check_not_orphaned`)."""
  if run.checkpoints.step_dirs() or step is not None:
    return run.checkpoints.restore(run.abstract_state(), step, quarantine=True)
  check_not_orphaned(run)
  if run.config.get('upcycle') and run.config.upcycle.from_workdir:
    return upcycled_state(run)
  return run.fresh_state(), None


def save_after_failure(run: Run, state, data_state: dict) -> str:
  """Save `state` (and the data iterator's `data_state`) if it is not mid non-finite streak;
  says what was saved."""
  step = int(jax.device_get(state.step))
  try:
    if int(jax.device_get(state.nonfinite_in_a_row)) == 0:
      run.checkpoints.save(state, data_state, force=True)
  except Exception as error:  # the disk that failed the metrics may fail this too
    return (f'the run stopped at step {step}; saving a checkpoint failed too ({error}); the '
            f'last complete checkpoint is step {run.checkpoints.latest_step()}')
  return (f'the run stopped at step {step}; the last complete checkpoint is step '
          f'{run.checkpoints.latest_step()} in {run.checkpoints.directory}')


# What eval, sample, analyze and export read of a checkpoint: the optimizer state (and an
# imported bfloat16 model's float32 master copy) never reaches the devices.
EVAL_FIELDS = ('step', 'params', 'balancing_bias_state')


def load(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(run, state) from the latest (or a given) checkpoint of `workdir`: the state's step, params
  and balancing biases (EVAL_FIELDS); its other fields are `orbax.checkpoint.PLACEHOLDER`."""
  run = open_run(config, workdir)
  if not run.checkpoints.step_dirs():
    raise InputError(f'no checkpoint in {run.checkpoints.directory}: train first')
  state, _ = run.checkpoints.restore(run.abstract_state(), step, only=EVAL_FIELDS)
  return run, state
