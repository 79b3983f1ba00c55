"""Data errors name the file or the dataset, and fail in seconds."""
import time

import pytest

from helpers import smoke_config
from moejax.errors import ConfigError
from moejax.data import sources
from moejax.train import loop


def _train(config, tmp_path):
  return loop.train(config, str(tmp_path / 'run'), quiet=True)


def test_a_missing_local_path_is_not_taken_for_a_dataset_name(tmp_path, tfds_dir):
  config = smoke_config(tfds_dir)
  config.data.source = str(tmp_path / 'corpus.txt')
  with pytest.raises(ConfigError, match=r"^data.source=.*corpus.txt' is invalid: no such file"):
    _train(config, tmp_path)
  config.data.source = 'data/timemachin.txt'
  with pytest.raises(ConfigError, match='no such file or directory'):
    _train(config, tmp_path)


def test_a_non_utf8_file_is_named(tmp_path, tfds_dir):
  corpus = tmp_path / 'latin1.txt'
  corpus.write_bytes('Caf\u00e9 au lait. '.encode('latin-1') * 400)
  config = smoke_config(tfds_dir)
  config.data.source = str(corpus)
  with pytest.raises(ConfigError, match=r"^data.source=.*latin1.txt' is invalid: it is not UTF-8 "
                                        r'text \(byte 3: invalid'):
    _train(config, tmp_path)


def test_a_corpus_shorter_than_one_example_is_refused(tmp_path, tfds_dir):
  corpus = tmp_path / 'short.txt'
  corpus.write_text('Too short to train on.\n' * 3)  # 69 characters: validation gets 7
  config = smoke_config(tfds_dir)
  config.data.source = str(corpus)
  with pytest.raises(ConfigError, match=r'^data.length=32 is invalid: the validation split of '
                                        r'.*short.txt has 8 tokens, fewer than one example'):
    _train(config, tmp_path)
  config.data.length = 10 ** 9  # used to try to allocate petabytes
  with pytest.raises(ConfigError, match=r'^data.length=1000000000 is invalid: the train split'):
    _train(config, tmp_path)


def test_an_unknown_dataset_name_is_refused(tmp_path, tfds_dir):
  config = smoke_config(tfds_dir)
  config.data.source = 'tiny_shakespear'
  with pytest.raises(ConfigError, match="^data.source='tiny_shakespear' is invalid: no such local "
                                        'path, and no TFDS dataset of that name'):
    _train(config, tmp_path)


def test_an_unprepared_dataset_without_network_fails_in_seconds(tmp_path, monkeypatch, tfds_dir):
  monkeypatch.setattr(sources, '_network_reachable', lambda: False)
  config = smoke_config(tfds_dir)
  config.data.source = 'tiny_shakespeare'
  start = time.perf_counter()
  with pytest.raises(ConfigError, match=r"^data.source='tiny_shakespeare' is invalid: the TFDS "
                                        r'dataset is not prepared in .*tfds.*tfds build'):
    _train(config, tmp_path)
  assert time.perf_counter() - start < 30


def test_the_network_probe_answers_in_seconds():
  start = time.perf_counter()
  sources._network_reachable(timeout=2.0)  # reachable or not: it must not hang
  assert time.perf_counter() - start < 10
