"""Damaged checkpoints are detected by their checksums and the previous complete step is used."""
import os
import re
import shutil
import warnings

import jax
import numpy as np
import pytest

from helpers import smoke_config
from moejax.train import loop
from moejax.train.checkpoint import (MANIFEST, CheckpointError, Checkpoints, CheckpointWarning)


@pytest.fixture
def trained(smoke_run):
  """The session's 5-step smoke run (checkpoints at steps 2, 4 and 5): (workdir, run, state)."""
  workdir, summary = smoke_run
  return workdir, summary['run'], summary['state']


@pytest.fixture
def copy(trained, tmp_path):
  """A private copy of the trained run's checkpoints: (Checkpoints, its directory, template)."""
  workdir, run, _ = trained
  directory = tmp_path / 'checkpoints'
  shutil.copytree(workdir / 'checkpoints', directory)
  return Checkpoints(str(directory), every_steps=2, keep=3), directory, run


_TEMPLATES = {}


def _restore(checkpoints, run, **kwargs):
  """restore() into a template state (made once per run: it only gives shapes and shardings)."""
  template = _TEMPLATES.setdefault(id(run), run.fresh_state())
  return checkpoints.restore(template, **kwargs)


def _flip_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


def _kinds(step_dir):
  """One file of each kind in a step directory (data files of a kind share a folder)."""
  seen, files = set(), []
  for path in sorted(step_dir.rglob('*')):
    if path.is_file() and path.name != MANIFEST:
      kind = (path.parent if path.parent.name == 'd' else path).relative_to(step_dir)
      if str(kind) not in seen:
        seen.add(str(kind))
        files.append(path.relative_to(step_dir))
  return files


def test_steps_are_sealed_with_a_manifest(copy):
  checkpoints, directory, _ = copy
  assert list(checkpoints.step_dirs()) == [2, 4, 5]
  assert all((directory / str(s) / MANIFEST).exists() for s in (2, 4, 5))
  assert checkpoints.latest_step() == 5 and checkpoints.problem(5) is None


@pytest.mark.slow
def test_a_flipped_byte_in_every_kind_of_file_falls_back(trained, tmp_path):
  workdir, run, _ = trained
  kinds = _kinds(workdir / 'checkpoints' / '5')
  assert len(kinds) >= 10  # metadata, commit markers, OCDBT manifests, array data, shardings
  for i, name in enumerate(kinds):
    directory = tmp_path / f'c{i}'
    shutil.copytree(workdir / 'checkpoints', directory)
    _flip_byte(directory / '5' / name)
    checkpoints = Checkpoints(str(directory), every_steps=2, keep=3)
    assert checkpoints.latest_step() == 4, name
    with pytest.warns(CheckpointWarning, match=f'step 5 .* checksum mismatch in {name}'):
      state, data_state = _restore(checkpoints, run)
    assert int(state.step) == 4 and data_state == {'next_index': 4}, name


def test_truncated_empty_and_partial_steps_fall_back(copy):
  checkpoints, directory, run = copy
  data = next(p for p in (directory / '5').rglob('*') if p.is_file() and p.parent.name == 'd')
  data.write_bytes(data.read_bytes()[:10])
  (directory / '7').mkdir()                                     # a stray empty step directory
  shutil.copytree(directory / '4', directory / '6')
  os.remove(directory / '6' / MANIFEST)                         # a save interrupted before sealing
  assert [checkpoints.problem(s) for s in (5, 6, 7)] == [
      f'checksum mismatch in {data.relative_to(directory / "5")}',
      'partial: no checksum manifest (interrupted save?)', 'empty']
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    state, _ = _restore(checkpoints, run)
  assert int(state.step) == 4
  assert [re.search(r'step \d+', str(w.message)).group() for w in caught] == [
      'step 7', 'step 6', 'step 5']


@pytest.mark.slow
def test_training_resumes_from_the_previous_step_and_saves_again(trained, tfds_dir, tmp_path):
  workdir, _, final = trained
  resumed = tmp_path / 'run'
  shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns('train.lock'))
  _flip_byte(next(p for p in (resumed / 'checkpoints' / '5').rglob('*')
                  if p.is_file() and p.parent.name == 'd'))
  config = smoke_config(tfds_dir)
  with pytest.warns(CheckpointWarning, match='step 5 .* moved to .*set_aside_checkpoints'):
    summary = loop.train(config, str(resumed), quiet=True)
  assert summary['step'] == 5
  checkpoints = Checkpoints(str(resumed / 'checkpoints'), 2, 3)
  assert checkpoints.latest_step() == 5 and checkpoints.problem(5) is None
  assert len(os.listdir(resumed / 'set_aside_checkpoints')) == 1
  # Steps 4 -> 5 again from the same data state: the same parameters as the first time.
  for a, b in zip(jax.tree.leaves(summary['state'].params), jax.tree.leaves(final.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_named_step_that_is_missing_or_damaged_is_an_error(copy):
  checkpoints, directory, run = copy
  with pytest.raises(CheckpointError, match=r'no checkpoint at step 3 .* saved steps: \[2, 4, 5\]'):
    _restore(checkpoints, run, step=3)
  _flip_byte(directory / '4' / 'meta' / 'metadata')
  with pytest.raises(CheckpointError, match=r'step 4 .* damaged: .* complete steps: \[2, 5\]'):
    _restore(checkpoints, run, step=4)
  assert int(_restore(checkpoints, run, step=2)[0].step) == 2


def test_when_every_step_is_damaged_nothing_restarts_silently(copy):
  checkpoints, directory, run = copy
  for step in (2, 4, 5):
    _flip_byte(directory / str(step) / 'meta' / 'metadata')
  with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match='no usable'):
    _restore(checkpoints, run)


def test_checkpoints_from_before_manifests_restore_with_a_warning(copy):
  checkpoints, directory, run = copy
  for step in (2, 4, 5):
    os.remove(directory / str(step) / MANIFEST)
  with pytest.warns(CheckpointWarning, match='predate checksum manifests'):
    state, _ = _restore(checkpoints, run)
  assert int(state.step) == 5


@pytest.mark.slow
def test_train_from_a_chosen_step_sets_the_later_ones_aside(trained, tfds_dir, tmp_path):
  workdir, _, final = trained
  resumed = tmp_path / 'run'
  shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns('train.lock'))
  config = smoke_config(tfds_dir)
  with pytest.warns(CheckpointWarning, match='step 5 .* training resumes from step 2'):
    summary = loop.train(config, str(resumed), quiet=True, step=2)
  assert summary['step'] == 5 and len(os.listdir(resumed / 'set_aside_checkpoints')) == 2
  for a, b in zip(jax.tree.leaves(summary['state'].params), jax.tree.leaves(final.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # 2 -> 5 again, exactly
