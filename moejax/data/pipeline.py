"""Packed examples -> batches (NumPy) through grain: the training stream shuffled, repeated and
read by each process for its own rows; the evaluation split in order.

Features of a batch:
  decoder LM:       targets [B, L] int32, weights [B, L] float32 (1 on real tokens, 0 on padding)
  encoder-decoder:  inputs [B, M] int32, input_mask [B, M] float32, targets [B, L], weights [B, L]
Decoder inputs are the targets shifted right (`moejax.train.inputs.shift_right`).

The training stream is a grain `MapDataset`, so any element can be read without the ones before:
element g is packed example `shuffle(seed, epoch)[g mod N]` of the split's N examples (reshuffled
every epoch), span corruption's noise drawn from (seed, g). Global batch s holds elements
s * B ... s * B + B - 1: a function of (data, seed, s) alone, whatever the number of processes.
Process p reads only its rows of each batch (`moejax.sharding.process_rows`: the rows its devices
hold), nothing else. The iterator's state ({'next_index': batches read}) goes into every
checkpoint; restoring it is O(1), not a replay of the consumed batches.
"""
from __future__ import annotations

import sys
from typing import Any

import grain
import numpy as np

from moejax.errors import ConfigError
from moejax.data.span_corruption import corrupted
from moejax.data.tokens import SplitTokens, num_examples, packed

# Threads that read (and span-corrupt) a batch's rows ahead of the step, and batches kept ready.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def check_corpus(data: Any, splits: dict[str, SplitTokens]) -> None:
  """Refuse a corpus whose split is shorter than one example of data.length tokens (it would
  train on one padded example)."""
  for split, tokens in splits.items():
    if len(tokens.tokens) < data.length:
      raise ConfigError('length', data.length, f'the {split} split of {data.source} has '
                        f'{len(tokens.tokens)} tokens, fewer than one example; use a shorter '
                        'data.length or more text', 'data')


def _examples(tokens: np.ndarray, data: Any, task: str, tokenizer) -> grain.MapDataset:
  """The split's packed examples, in order (whole ones only for span corruption)."""
  count = num_examples(len(tokens), data.length, whole_only=task == 'span_corruption')
  return grain.MapDataset.range(count).map(
      lambda i: packed(tokens, data.length, i, tokenizer.pad_id))


def _span_corrupted(examples: grain.MapDataset, data: Any, tokenizer,
                    seed: int) -> grain.MapDataset:
  """Element i's noise is drawn from (seed, i); the sentinels are the tokenizer's."""
  sentinels = tokenizer.sentinel_ids(data.num_sentinels)
  return examples.map_with_index(
      lambda i, example: corrupted(example, np.random.default_rng([seed, i]), data, sentinels,
                                   tokenizer.eos_id))


def train_stream(tokens: np.ndarray, data: Any, task: str, tokenizer,
                 seed: int) -> grain.MapDataset:
  """The endless global stream of training examples (random access; see the module's doc)."""
  stream = _examples(tokens, data, task, tokenizer).shuffle(seed).repeat()
  if task == 'span_corruption':
    stream = _span_corrupted(stream, data, tokenizer, seed)
  return stream


def train_batches(tokens: np.ndarray, data: Any, task: str, tokenizer, batch_size: int,
                  seed: int, rows: slice, state: dict | None = None) -> grain.DatasetIterator:
  """This process's `rows` of each global training batch of `batch_size`, from the iterator
  `state` saved in a checkpoint (None: the first batch). `get_state()` says where it is."""
  stream = train_stream(tokens, data, task, tokenizer, seed)
  width = rows.stop - rows.start
  own = grain.MapDataset.range(sys.maxsize).map(
      lambda i: stream[i // width * batch_size + rows.start + i % width])
  iterator = iter(own.batch(width).to_iter_dataset(READ_OPTIONS))
  if state is not None:
    iterator.set_state(state)
  return iterator


def eval_batches(tokens: np.ndarray, data: Any, task: str, tokenizer, batch_size: int,
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """The whole evaluation split (or its first `max_batches`), in order, in full-size batches.

  The last batch is completed with all-padding rows (weight 0) so one compiled step serves all.
  Span corruption draws element i's noise from (0, i): the same every evaluation.
  """
  examples = _examples(tokens, data, task, tokenizer)
  if task == 'span_corruption':
    examples = _span_corrupted(examples, data, tokenizer, seed=0)
  count = len(examples) if not max_batches else min(len(examples), max_batches * batch_size)
  batches = []
  for start in range(0, count, batch_size):
    rows = [examples[i] for i in range(start, min(start + batch_size, count))]
    batches.append({k: np.pad(np.stack([r[k] for r in rows]),
                              [(0, batch_size - len(rows))] + [(0, 0)] * rows[0][k].ndim)
                    for k in rows[0]})
  return batches


def chars_per_token(split: SplitTokens) -> float:
  """Characters per token of a split (EOS included), to report nats/char."""
  return split.chars / max(len(split.tokens), 1)
