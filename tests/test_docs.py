"""The README's config tables name every config field, so the docs cannot fall behind the code."""
import dataclasses
import os

import ml_collections

from helpers import REPO
from moejax import ModelConfig, MoeLayer
from moejax.train.config import default_config


def _fields(config: ml_collections.ConfigDict, prefix=()):
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, (*prefix, name))
    else:
      yield (*prefix, name)


def test_readme_names_every_config_and_layer_field():
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  names = {path[-1] for path in _fields(default_config())}
  names |= {f.name for f in dataclasses.fields(ModelConfig)}
  names |= {f.name for f in dataclasses.fields(MoeLayer)} - {'parent', 'name'}
  missing = sorted(name for name in names if f'`{name}`' not in readme)
  assert not missing, f'README.md does not document {missing}'
