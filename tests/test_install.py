"""Installable where researchers work: no TensorFlow in the base install (Colab brings its own),
a TensorFlow extra that names a package with wheels on each platform, and imports that do not load
TensorFlow. Read from the installed package's metadata: what pip sees."""
import os
import subprocess
import sys
from importlib import metadata

from packaging.requirements import Requirement

# PEP 508 environments, and the TensorFlow distribution that has wheels there (checked against
# PyPI with `pip install --dry-run --only-binary=:all: --platform ...`, 2026-11-28).
PLATFORMS = {
    ('linux', 'x86_64'): 'tensorflow-cpu',
    ('linux', 'aarch64'): 'tensorflow',
    ('darwin', 'arm64'): 'tensorflow',
    ('darwin', 'x86_64'): 'tensorflow',  # 2.16 is the last with macOS x86-64 wheels
}


def _required(environment: dict) -> dict[str, Requirement]:
  requirements = map(Requirement, metadata.requires('moejax'))
  return {r.name: r for r in requirements if r.marker is None or r.marker.evaluate(environment)}


def test_tensorflow_is_an_extra_with_one_package_per_platform():
  base = _required({'extra': ''})
  assert not {'tensorflow', 'tensorflow-cpu'} & set(base)
  for (system, machine), package in PLATFORMS.items():
    environment = {'sys_platform': system, 'platform_machine': machine}
    with_tf = set(_required({**environment, 'extra': 'tf'})) - set(base)
    assert with_tf == {package}, (system, machine, with_tf)
  intel_mac = _required({'sys_platform': 'darwin', 'platform_machine': 'x86_64', 'extra': 'tf'})
  assert not intel_mac['tensorflow'].specifier.contains('2.17.0')


def test_the_layer_models_and_sampling_import_without_tensorflow():
  code = ('import sys, moejax, moejax.models, moejax.nnx, moejax.train, moejax.train.sampling; '
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_grain_is_required_wherever_it_has_wheels():
  for (system, machine) in PLATFORMS:
    required = _required({'sys_platform': system, 'platform_machine': machine, 'extra': ''})
    assert ('grain' in required) == ((system, machine) != ('darwin', 'x86_64')), (system, machine)
