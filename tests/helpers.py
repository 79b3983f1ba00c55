"""Shared by the training, data and CLI tests: the smoke config, loaded as the CLI loads it."""
import os

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
