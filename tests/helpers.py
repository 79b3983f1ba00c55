"""Shared by the tests: the smoke config (loaded as the CLI loads it), a layer's init and apply."""
import os

import jax

from moejax.train.config import config_from_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = os.path.join('experiments', 'configs', 'smoke.py')


def smoke_config(data_dir, **train):
  """experiments/configs/smoke.py with its TFDS data_dir in `data_dir` and `train` overrides."""
  config = config_from_file(os.path.join(REPO, SMOKE_CONFIG))
  config.data.source = os.path.join(REPO, config.data.source)
  config.data.data_dir = str(data_dir)
  config.train.update(train)
  return config


def init_layer(layer, x, **kwargs):
  """Variables of a layer initialized on x [B, L, D] (deterministic)."""
  return layer.init(jax.random.key(42), x, True, **kwargs)


def apply_layer(layer, variables, x, deterministic=True, **kwargs):
  """(output, state): the layer applied with its 'intermediates' collected."""
  return layer.apply(variables, x, deterministic, mutable=['intermediates'], **kwargs)
