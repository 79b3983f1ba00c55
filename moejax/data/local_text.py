"""A TFDS builder for local text: one file, or every file of a directory.

Each file is split by characters, the first `1 - validation_fraction` to `train` and the rest to
`validation` (nanoGPT's split of tiny shakespeare); each part is one example {'text': ...}. The
builder is prepared once into `data_dir` like any TFDS dataset; its config name records the path
and the fraction, so another corpus or split never reuses a stale preparation.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re

import tensorflow_datasets as tfds

from moejax.errors import ConfigError, InputError


@dataclasses.dataclass
class LocalTextConfig(tfds.core.BuilderConfig):
  path: str = ''
  validation_fraction: float = 0.1


def _files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if not n.startswith('.'))
    files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if files:
      return files
  raise FileNotFoundError(f'no text file at {path!r} (a file, or a directory of files)')


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Local text files as a TFDS dataset with `train` and `validation` splits."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Character split of each file into train / validation.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f'Text of {self.builder_config.path}',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in ('train', 'validation')}

  def _generate_examples(self, split):
    fraction = self.builder_config.validation_fraction
    for path in _files(self.builder_config.path):
      with open(path, encoding='utf-8') as f:
        text = f.read()
      cut = int(len(text) * (1 - fraction))
      part = text[:cut] if split == 'train' else text[cut:]
      if part:
        yield os.path.basename(path), {'text': part}


def check_utf8(path: str) -> int:
  """The characters of a file; refuse one that is not UTF-8 text, naming it and the first bad
  byte."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return len(data.decode('utf-8'))
  except UnicodeDecodeError as error:
    raise ConfigError('source', path, f'it is not UTF-8 text (byte {error.start}: {error.reason}, '
                      f'{data[error.start:error.start + 4]!r}); convert it, e.g. iconv -f latin1 '
                      '-t utf-8', 'data') from None


def check_splits(path: str, lengths: list[int], validation_fraction: float) -> None:
  """Refuse text that leaves the train or the validation split without a character (TFDS would
  fail on a split without examples): one line naming `path`. lengths: characters per file."""
  if not sum(lengths):
    raise InputError(f'data.source {path} is empty: there is no text to train on')
  cuts = [int(n * (1 - validation_fraction)) for n in lengths]  # as _generate_examples cuts
  if not any(cuts) or all(cut == n for cut, n in zip(cuts, lengths)):
    raise InputError(f'data.source {path} is too short ({sum(lengths)} characters) to cut into '
                     f'a train and a validation split (data.validation_fraction='
                     f'{validation_fraction:g})')


@functools.lru_cache(maxsize=16)
def local_text_builder(path: str, validation_fraction: float,
                       data_dir: str | None) -> LocalText:
  """The prepared builder for `path` (prepared on first use into `data_dir`; one per process)."""
  files = _files(path)
  check_splits(path, [check_utf8(file) for file in files], validation_fraction)
  signature = '|'.join(f'{os.path.abspath(p)}:{os.path.getsize(p)}:{os.path.getmtime(p)}'
                       for p in files) + f'|{validation_fraction}'
  stem = re.sub(r'[^a-z0-9]+', '_', os.path.basename(os.path.normpath(path)).lower()).strip('_')
  name = f'{stem or "text"}_{hashlib.sha256(signature.encode()).hexdigest()[:10]}'
  builder = LocalText(config=LocalTextConfig(name=name, path=path,
                                             validation_fraction=validation_fraction),
                      data_dir=data_dir)
  tfds.disable_progress_bar()
  builder.download_and_prepare()
  return builder
