"""Which book is a passage from? A two-class downstream task cut from the shipped corpora.

Each book (a local text file) is split by bytes into train (the first 80%), validation (the next
10%) and test (the last 10%: for tiny shakespeare, inside the language-modelling validation split,
so a model pretrained on its `train` split never saw it); each part is cut into non-overlapping
passages of `length` bytes. The label of a passage is the index of its book. The books differ in
size (tiny shakespeare is 6x The Time Machine): `balanced_batches` draws half of each batch from
each book, and accuracy should be reported per book.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from moejax.data.tokenizers import ByteTokenizer

BOOKS = ('data/tinyshakespeare.txt', 'data/timemachine.txt')
SPLITS = {'train': (0.0, 0.8), 'validation': (0.8, 0.9), 'test': (0.9, 1.0)}


def book_passages(paths: Sequence[str], split: str,
                  length: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(byte-token passages [N, length] int32, labels [N] int32: the index of the passage's book)."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r} is invalid: it must be one of {tuple(SPLITS)}')
  start, stop = SPLITS[split]
  tokens, labels = [], []
  for label, path in enumerate(paths):
    with open(path, 'rb') as f:
      data = f.read()
    part = data[int(len(data) * start):int(len(data) * stop)]
    count = len(part) // length
    if count == 0:
      raise ValueError(f'{path}: its {split} part ({len(part)} bytes) is shorter than one passage')
    ids = ByteTokenizer().encode(part[:count * length])
    tokens.append(ids.reshape(count, length))
    labels.append(np.full(count, label, np.int32))
  return np.concatenate(tokens), np.concatenate(labels)


def balanced_batches(tokens: np.ndarray, labels: np.ndarray, batch_size: int,
                     seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless (tokens [B, L], labels [B]) batches, an equal share of each class (B must divide
  among them), each class's passages reshuffled whenever they run out."""
  classes = np.unique(labels)
  if batch_size % len(classes):
    raise ValueError(f'batch_size={batch_size} must be a multiple of the {len(classes)} classes')
  per_class = batch_size // len(classes)
  rng = np.random.default_rng(seed)
  pools = {c: np.flatnonzero(labels == c) for c in classes}
  queues = {c: np.empty(0, np.int64) for c in classes}
  while True:
    rows = []
    for c in classes:
      while len(queues[c]) < per_class:
        queues[c] = np.concatenate([queues[c], rng.permutation(pools[c])])
      rows.append(queues[c][:per_class])
      queues[c] = queues[c][per_class:]
    rows = rng.permutation(np.concatenate(rows))
    yield tokens[rows], labels[rows]
