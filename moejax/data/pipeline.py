"""Text -> tokens -> packed fixed-length examples -> shuffled batches (tf.data, numpy out).

Features of a batch (numpy):
  decoder LM:       targets [B, L] int32, weights [B, L] float32 (1 on real tokens, 0 on padding)
  encoder-decoder:  inputs [B, M] int32, input_mask [B, M] float32, targets [B, L], weights [B, L]
Decoder inputs are the targets shifted right (`moejax.train.inputs.shift_right`).

Determinism: the training stream is a function of (data, seed) alone: packed examples are shuffled
with the seed, reshuffled each epoch from it, and span corruption draws its noise from (seed, index
in the stream). `train_batches(..., start=n)` skips the first n batches, which is how a resumed run
continues where the checkpoint left off. Every process builds the same global batches (and keeps
its own rows of each: `moejax.train.run.Run.to_global`), so a run's numbers do not depend on how
many processes feed it.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from moejax.errors import ConfigError
from moejax.data.local_text import local_text_builder
from moejax.data.tokenizers import EOS_ID, PAD_ID, make_tokenizer

tf.config.set_visible_devices([], 'GPU')  # TensorFlow only feeds data; JAX owns accelerators


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


def documents(data: Any, split: str) -> tf.data.Dataset:
  """The split's documents as a dataset of tf.string.

  `data.source` is a local file or directory (the LocalText builder) or a registered TFDS name
  (`tiny_shakespeare`, `lm1b`, `c4/en`, ...) loaded with `tfds.load` from `data.data_dir`.
  """
  if is_local(data.source):
    if not os.path.exists(data.source):
      raise ConfigError('source', data.source, 'no such file or directory', 'data')
    builder = local_text_builder(data.source, data.validation_fraction, data.data_dir)
  else:
    builder = _tfds_builder(data)
    builder.download_and_prepare()
  dataset = builder.as_dataset(split=split, shuffle_files=False)
  return dataset.map(lambda example: example[data.text_key])


def check_corpus(data: Any, tokenizer) -> None:
  """Refuse a local corpus whose train or validation split is shorter than one example of
  data.length tokens (it would train on one padded example)."""
  if not is_local(data.source):
    return
  for split in (data.train_split, data.eval_split):
    tokens = sum(len(tokenizer.encode(text)) + 1 for text in tfds.as_numpy(documents(data, split)))
    if tokens < data.length:
      raise ConfigError('length', data.length, f'the {split} split of {data.source} has '
                        f'{tokens} tokens, fewer than one example; use a shorter data.length or '
                        'more text', 'data')


def tokenizer_for(data: Any, workdir: str | None):
  """The run's tokenizer; a trained SentencePiece vocabulary is cached in the workdir."""
  cache = os.path.join(workdir, 'spm.model') if workdir else None

  def train_texts():
    for text in tfds.as_numpy(documents(data, data.train_split)):
      yield text.decode('utf-8')

  return make_tokenizer(data.tokenizer, data.spm_model, data.spm_vocab_size, train_texts, cache)


def tokenize(docs: tf.data.Dataset, tokenizer) -> tf.data.Dataset:
  """Documents -> int32 token vectors, each ending with EOS."""
  def encode(text):
    return np.append(tokenizer.encode(text), np.int32(EOS_ID)).astype(np.int32)
  return docs.map(lambda t: tf.ensure_shape(tf.numpy_function(encode, [t], tf.int32), [None]))


def pack(tokens: tf.data.Dataset, length: int) -> tf.data.Dataset:
  """Concatenate token vectors into one stream and cut it into [length] examples.

  The last example is padded with PAD_ID; `weights` marks the real tokens.
  """
  chunks = tokens.unbatch().batch(length)
  return chunks.map(lambda t: {
      'targets': tf.pad(t, [[0, length - tf.shape(t)[0]]], constant_values=PAD_ID),
      'weights': tf.pad(tf.ones_like(t, tf.float32), [[0, length - tf.shape(t)[0]]])})


def random_segments(total: int, num: int, rng: np.random.Generator) -> np.ndarray:
  """`total` split into `num` positive parts at random (T5's random_segmentation)."""
  cuts = np.sort(rng.choice(np.arange(1, total), num - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [total]]))


def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) for T5 span corruption of `length` tokens."""
  num_noise = int(np.clip(round(length * noise_density), 1, length - 1))
  num_spans = int(np.clip(round(num_noise / mean_span_length), 1, min(num_noise,
                                                                        length - num_noise)))
  return num_noise, num_spans


def span_corruption_lengths(length: int, noise_density: float,
                            mean_span_length: float) -> tuple[int, int]:
  """(M, L): encoder input and decoder target lengths after corrupting `length` tokens."""
  num_noise, num_spans = span_lengths(length, noise_density, mean_span_length)
  return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corrupt(tokens: np.ndarray, rng: np.random.Generator, noise_density: float,
                 mean_span_length: float, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """T5 span corruption of tokens [N] -> (inputs [M], targets [L]), both ending with EOS.

  Noise spans are replaced by sentinels in the inputs; the targets list each sentinel followed by
  the span it replaced. Sentinel i is `vocab_size - 1 - i` (T5's convention: the top ids).
  """
  num_noise, num_spans = span_lengths(len(tokens), noise_density, mean_span_length)
  noise = random_segments(num_noise, num_spans, rng)
  keep = random_segments(len(tokens) - num_noise, num_spans, rng)
  inputs, targets, start = [], [], 0
  for i, (k, n) in enumerate(zip(keep, noise)):
    sentinel = vocab_size - 1 - i
    inputs += [*tokens[start:start + k], sentinel]
    targets += [sentinel, *tokens[start + k:start + k + n]]
    start += k + n
  return (np.array(inputs + [EOS_ID], np.int32), np.array(targets + [EOS_ID], np.int32))


def span_corruption(examples: tf.data.Dataset, data: Any, vocab_size: int,
                    seed: int) -> tf.data.Dataset:
  """Packed LM examples -> encoder-decoder examples; the noise of element i is drawn from (seed, i)."""
  inputs_len, targets_len = span_corruption_lengths(data.length, data.noise_density,
                                                    data.mean_span_length)

  def corrupt(index, targets):
    rng = np.random.default_rng([seed, int(index)])
    return span_corrupt(targets, rng, data.noise_density, data.mean_span_length, vocab_size)

  def to_features(index, example):
    inputs, targets = tf.numpy_function(corrupt, [index, example['targets']], [tf.int32, tf.int32])
    inputs, targets = tf.ensure_shape(inputs, [inputs_len]), tf.ensure_shape(targets, [targets_len])
    return {'inputs': inputs, 'input_mask': tf.cast(inputs != PAD_ID, tf.float32),
            'targets': targets, 'weights': tf.cast(targets != PAD_ID, tf.float32)}

  # Span corruption needs a full example: drop the padded tail of the stream.
  full = examples.filter(lambda e: tf.reduce_all(e['weights'] > 0))
  return full.enumerate().map(to_features)


def examples(data: Any, split: str, tokenizer) -> tf.data.Dataset:
  """Packed [length] examples of the split."""
  return pack(tokenize(documents(data, split), tokenizer), data.length)


def model_vocab_size(tokenizer, data: Any, task: str) -> int:
  """V: the tokenizer's vocabulary, plus the sentinels of span corruption."""
  return tokenizer.vocab_size + (data.num_sentinels if task == 'span_corruption' else 0)


def train_batches(data: Any, tokenizer, task: str, batch_size: int, seed: int,
                  start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless shuffled global training batches, from batch number `start`."""
  dataset = examples(data, data.train_split, tokenizer)
  dataset = dataset.shuffle(data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  if task == 'span_corruption':
    dataset = span_corruption(dataset, data, model_vocab_size(tokenizer, data, task), seed)
  dataset = dataset.batch(batch_size, drop_remainder=True).skip(start)
  return iter(tfds.as_numpy(dataset.prefetch(2)))


def eval_batches(data: Any, tokenizer, task: str, batch_size: int,
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """The whole evaluation split (or its first `max_batches`), in order, in full-size batches.

  The last batch is completed with all-padding rows (weight 0) so one compiled step serves all.
  """
  dataset = examples(data, data.eval_split, tokenizer)
  if task == 'span_corruption':
    dataset = span_corruption(dataset, data, model_vocab_size(tokenizer, data, task), seed=0)
  if max_batches:
    dataset = dataset.take(max_batches * batch_size)
  batches = list(tfds.as_numpy(dataset.batch(batch_size)))
  return [{k: np.pad(v, [(0, batch_size - len(v))] + [(0, 0)] * (v.ndim - 1))
           for k, v in b.items()} for b in batches]


def chars_per_token(data: Any, tokenizer, split: str) -> float:
  """Characters per token of the whole split (EOS included), to report nats/char."""
  chars = tokens = 0
  for text in tfds.as_numpy(documents(data, split)):
    chars += len(text.decode('utf-8'))
    tokens += len(tokenizer.encode(text)) + 1
  return chars / max(tokens, 1)
