"""Where documents come from: a local text file or directory (the LocalText builder), or a
registered TFDS dataset (`tiny_shakespeare`, `lm1b`, `c4/en`, ...) read from `data.data_dir`.

Only process 0 reads documents (`moejax.data.tokens` tokenizes them once for every process, and the
vocabulary is trained there), so only process 0 prepares a dataset.
"""
from __future__ import annotations

import os
import re
import socket
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from moejax.errors import ConfigError
from moejax.data.local_text import local_text_builder

tf.config.set_visible_devices([], 'GPU')  # TensorFlow only reads data; JAX owns accelerators


def is_local(source: str) -> bool:
  """Whether data.source names a local file or directory (else a TFDS dataset name): it exists,
  or it looks like a path ('./x', '/x', '~/x', 'corpus.txt'; TFDS names have no such suffix)."""
  return (os.path.exists(source) or source.startswith(('.', '/', '~'))
          or re.search(r'\.[A-Za-z]+$', source) is not None)


def _network_reachable(host: str = 'storage.googleapis.com', timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def _tfds_builder(data: Any):
  """The TFDS builder of data.source, refusing in seconds (naming the field) an unknown name, or
  an unprepared dataset when the network is out of reach (TFDS would retry for minutes)."""
  try:
    builder = tfds.builder(data.source, data_dir=data.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError('source', data.source, 'no such local path, and no TFDS dataset of that '
                      'name', 'data') from None
  if not builder.is_prepared() and not _network_reachable():
    raise ConfigError('source', data.source, f'the TFDS dataset is not prepared in '
                      f'{builder.data_dir} and the network is unreachable to download it; '
                      f'prepare it where there is network (tfds build {data.source} '
                      '--data_dir DIR), then set data.data_dir=DIR', 'data')
  return builder


def prepared_builder(data: Any) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `data.source` (prepared on first use)."""
  if is_local(data.source):
    if not os.path.exists(data.source):
      raise ConfigError('source', data.source, 'no such file or directory', 'data')
    return local_text_builder(data.source, data.validation_fraction, data.data_dir)
  builder = _tfds_builder(data)
  builder.download_and_prepare()
  return builder


def dataset_name(data: Any) -> str:
  """The prepared dataset's full name ('local_text/<file>_<hash>/1.0.0', 'lm1b/1.1.0', ...)."""
  return prepared_builder(data).info.full_name


def documents(data: Any, split: str) -> tf.data.Dataset:
  """The split's documents as a dataset of tf.string (field `data.text_key`)."""
  dataset = prepared_builder(data).as_dataset(split=split, shuffle_files=False)
  return dataset.map(lambda example: example[data.text_key])
