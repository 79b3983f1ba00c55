"""Installable where researchers work: no TensorFlow in the base install (Colab brings its own),
a TensorFlow extra with wheels on each platform, and imports that do not load TensorFlow."""
import os
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

from helpers import REPO

PLATFORMS = {  # PEP 508 environments: tensorflow-cpu publishes Linux x86-64 wheels only
    'linux x86_64': {'sys_platform': 'linux', 'platform_machine': 'x86_64'},
    'linux aarch64': {'sys_platform': 'linux', 'platform_machine': 'aarch64'},
    'macos arm64': {'sys_platform': 'darwin', 'platform_machine': 'arm64'},
    'macos x86_64': {'sys_platform': 'darwin', 'platform_machine': 'x86_64'},
}


def _project():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']


def _names(requirements, environment):
  return {r.name for r in map(Requirement, requirements)
          if r.marker is None or r.marker.evaluate(environment)}


def test_tensorflow_is_an_extra_with_one_package_per_platform():
  project = _project()
  assert not {'tensorflow', 'tensorflow-cpu'} & _names(project['dependencies'], {})
  for name, environment in PLATFORMS.items():
    expected = {'tensorflow-cpu'} if name == 'linux x86_64' else {'tensorflow'}
    assert _names(project['optional-dependencies']['tf'], environment) == expected, name


def test_the_layer_models_and_sampling_import_without_tensorflow():
  code = ('import sys, moejax, moejax.models, moejax.nnx, moejax.train, moejax.train.sampling; '
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
