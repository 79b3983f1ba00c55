"""Test set-up: 8 simulated CPU devices and a persistent compilation cache, both set before jax is
imported anywhere (subprocesses inherit them); session-wide fixtures that tests share read-only.

The compilation cache lives in a temporary directory made for this pytest session (and shared by
its xdist workers and the command lines the tests start), removed when the session ends: the
same programs, compiled by many tests, are compiled once, and nothing leaks between clones or
sessions. It keeps every program, however quick to compile: eager code compiles each op alone
(131 programs for one MoeLayer.init), and a process that finds them in the cache initialises the
layer 2.7 times faster (test_layer + test_variants, fast tier, 2 workers: 350 s with every
program kept, 417 s with those over 0.2 s only, under load).
"""
import os
import shutil
import tempfile

from xla_flags import xla_flags  # tests/xla_flags.py

os.environ['XLA_FLAGS'] = xla_flags(8)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'MOEJAX_TEST_JAX_CACHE' not in os.environ:  # the session's first process (not an xdist worker)
  os.environ['MOEJAX_TEST_JAX_CACHE'] = tempfile.mkdtemp(prefix='moejax-test-jax-cache-')
  _CACHE_OWNER = True
else:
  _CACHE_OWNER = False
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['MOEJAX_TEST_JAX_CACHE']
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import pytest  # noqa: E402


def pytest_unconfigure(config):
  if _CACHE_OWNER and not hasattr(config, 'workerinput'):
    shutil.rmtree(os.environ['MOEJAX_TEST_JAX_CACHE'], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Every test that reads a corpus through the data pipeline (TensorFlow, a TFDS preparation),
  which is every test that trains a run, is slow: those that ask for `tfds_dir` (`smoke_run` and
  `copy_run` do). `make test-fast` leaves them out; `make test` runs them first."""
  for item in items:
    if 'tfds_dir' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.slow)
  # The slow tests first: the two xdist workers then end on short tests, together.
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A TFDS data_dir shared by the session's tests: each local corpus is prepared into it once."""
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='session')
def smoke_run(tfds_dir, tmp_path_factory):
  """One finished 5-step smoke run (checkpoints at steps 2, 4 and 5), trained once per session:
  (workdir, summary). Read-only: a test that damages or extends a run copies it first
  (`copy_run`)."""
  from helpers import smoke_config
  from moejax.train import loop
  workdir = tmp_path_factory.mktemp('smoke_run') / 'run'
  summary = loop.train(smoke_config(tfds_dir), str(workdir), quiet=True)
  summary['run'].checkpoints.close()
  return workdir, summary


@pytest.fixture
def copy_run(smoke_run, tmp_path):
  """A private copy of the session's smoke run: the workdir."""
  workdir = tmp_path / 'run'
  shutil.copytree(smoke_run[0], workdir)
  return workdir
