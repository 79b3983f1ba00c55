"""A split as one stream of tokens, tokenized once and memory-mapped by every process.

The documents of a split (`moejax.data.sources.documents`), each tokenized as `Tokenizer.document` makes it, are
concatenated into tokens [T] int32 and cut into examples of L tokens (`packed`). Process 0 alone
prepares the dataset, reads it and writes `<directory>/<key>.npy` (atomically, then `<key>.json`:
the split's characters and tokens); every process waits for its verdict and memory-maps the file, so
each reads only the pages of the rows it feeds. The key is a hash of what the tokens depend on (the
prepared dataset's name and version, the split, the text field and the tokenizer), so another
corpus, split or vocabulary never reuses a stale file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from moejax.distributed import on_lead
from moejax.data.sources import dataset_name, documents


@dataclasses.dataclass(frozen=True)
class SplitTokens:
  """A split's token stream and how many characters it came from (for nats per character)."""
  tokens: np.ndarray  # Shape: [T], int32, every document as `Tokenizer.document` makes it
  chars: int


def tokenize(texts, tokenizer) -> SplitTokens:
  """Documents (str or UTF-8 bytes) -> their tokens, each as `tokenizer.document` makes it
  (ended with eos, started with bos where the tokenizer adds one)."""
  pieces, chars = [], 0
  for text in texts:
    text = text.decode('utf-8') if isinstance(text, bytes) else text
    chars += len(text)
    pieces.append(tokenizer.document(text))
  tokens = np.concatenate(pieces) if pieces else np.zeros([0], np.int32)
  return SplitTokens(tokens, chars)


def _key(data: Any, split: str, tokenizer) -> str:
  what = [dataset_name(data), split, data.text_key, tokenizer.key()]
  return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:20]


def _write(directory: str, key: str, split: SplitTokens) -> None:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, key)
  with open(path + '.npy.tmp', 'wb') as f:
    np.save(f, split.tokens)
  with open(path + '.json.tmp', 'w') as f:
    json.dump({'chars': split.chars, 'tokens': len(split.tokens)}, f)
  os.replace(path + '.npy.tmp', path + '.npy')
  os.replace(path + '.json.tmp', path + '.json')  # last: the pair is complete when it exists


def split_tokens(data: Any, split: str, tokenizer, directory: str | None) -> SplitTokens:
  """The split's tokens, memory-mapped from `directory` (a directory every process sees, e.g.
  the work directory's tokens/), where process 0 writes them on first use. Without a directory
  the split is tokenized in memory."""
  if directory is None:
    return tokenize(_texts(data, split), tokenizer)

  def write_once() -> str:
    key = _key(data, split, tokenizer)
    if not os.path.exists(os.path.join(directory, key + '.json')):
      _write(directory, key, tokenize(_texts(data, split), tokenizer))
    return key

  path = os.path.join(directory, on_lead(write_once, f'tokenize the {split} split'))
  with open(path + '.json') as f:
    chars = json.load(f)['chars']
  return SplitTokens(np.load(path + '.npy', mmap_mode='r'), chars)


def _texts(data: Any, split: str):
  import tensorflow_datasets as tfds
  return tfds.as_numpy(documents(data, split))


def num_examples(num_tokens: int, length: int, whole_only: bool = False) -> int:
  """Examples of `length` tokens in a stream of `num_tokens`: the last one padded, or left out
  with `whole_only` (span corruption needs whole examples)."""
  return num_tokens // length if whole_only else -(-num_tokens // length)


def packed(tokens: np.ndarray, length: int, index: int, pad_id: int) -> dict[str, np.ndarray]:
  """Example `index` of the stream cut into `length` tokens: targets [L] int32, padded with
  `pad_id` past the end, and weights [L] float32 (1 on real tokens)."""
  piece = np.asarray(tokens[index * length:(index + 1) * length], np.int32)
  pad = length - len(piece)
  return {'targets': np.pad(piece, (0, pad), constant_values=pad_id),
          'weights': np.pad(np.ones(len(piece), np.float32), (0, pad))}
