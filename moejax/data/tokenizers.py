"""Tokenizers: byte-level (the default, nothing to download) and SentencePiece.

Both reserve the T5 ids pad = 0, eos = 1, unk = 2. The byte tokenizer maps byte b to b + 3 (ByT5's
layout, V = 259), so on ASCII text one token is one character.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np

from moejax.errors import ConfigError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
TOKENIZERS = ('bytes', 'sentencepiece')  # data.tokenizer


class ByteTokenizer:
  """UTF-8 bytes, offset by the 3 reserved ids."""
  vocab_size = 256 + 3
  pad_id, eos_id = PAD_ID, EOS_ID

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32) + 3

  def decode(self, ids: Iterable[int]) -> str:
    """Text of the byte ids; reserved ids and ids past the bytes (sentinels) are skipped."""
    ids = np.asarray(list(ids), np.int64)
    ids = ids[(ids >= 3) & (ids < self.vocab_size)] - 3
    return bytes(ids.astype(np.uint8)).decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model (a `.model` file, or one trained by `train_sentencepiece`)."""

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError('the SentencePiece model must use pad=0, eos=1, unk=2 (T5 ids); got '
                       f'pad={self._sp.pad_id()}, eos={self._sp.eos_id()}, '
                       f'unk={self._sp.unk_id()}')
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.eos_id = PAD_ID, EOS_ID

  @classmethod
  def load(cls, path: str) -> SentencePieceTokenizer:
    with open(path, 'rb') as f:
      return cls(f.read())

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode('utf-8') if isinstance(text, bytes) else text
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if UNK_ID < i < self.vocab_size])


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
  """Train a unigram SentencePiece vocabulary on `texts` (an iterable of documents)."""
  import sentencepiece as spm
  lines = (line for text in texts for line in text.splitlines() if line.strip())
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type='unigram',
      character_coverage=1.0, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  return SentencePieceTokenizer(model.getvalue())


def make_tokenizer(kind: str, spm_model: str | None, vocab_size: int, train_texts,
                   cache_path: str | None = None):
  """'bytes', or 'sentencepiece' from `spm_model` (a .model file) or trained on `train_texts()`.

  A trained vocabulary is written to `cache_path` (the run's work directory) and reused from
  there, so `eval` and `sample` see the vocabulary `train` used.
  """
  if kind == 'bytes':
    return ByteTokenizer()
  path = spm_model or cache_path
  if path and os.path.exists(path):
    return SentencePieceTokenizer.load(path)
  if spm_model:
    raise ConfigError('spm_model', spm_model, 'no such file', 'data')
  tokenizer = train_sentencepiece(train_texts(), vocab_size)
  if cache_path:
    with open(cache_path + '.tmp', 'wb') as f:
      f.write(tokenizer.model_proto)
    os.replace(cache_path + '.tmp', cache_path)  # a crash leaves no half-written vocabulary
  return tokenizer
