"""Tokenizers: byte-level (the default, nothing to download), SentencePiece (trained on the corpus
or a `.model` file) and a hub checkpoint's own (`data.tokenizer='hub'`).

A tokenizer owns its special ids; nothing else in moejax hard-codes them:
  pad_id, eos_id, unk_id, bos_id   (bos_id None: it has none; pad_id, when the vocabulary has no
                                    pad, is eos: padding is masked by weights, never by its id)
  sentinel_ids(n)                  span corruption's n sentinels: its own `<extra_id_i>` when it
                                    has them (T5, Switch), else the n ids just past its vocabulary
  start_id(kind)                   what a decoder reads before the first target (below)
`encode(text)` and `decode(ids)` are plain text without special tokens; `document(text)` is a
document as the data pipeline packs it: bos (where the tokenizer adds one), the text, eos.

moejax's own tokenizers (bytes, SentencePiece trained here) keep T5's ids (pad 0, eos 1, unk 2),
and a decoder starts from pad as T5's does. A hub tokenizer's ids come from its files: tokenizer.json
read through the `tokenizers` library (BPE, byte-level BPE, SentencePiece-style BPE and Unigram),
or spiece.model / tokenizer.model through sentencepiece, with the special tokens named by
tokenizer_config.json, then generation_config.json and config.json. Its decoder LM starts from
bos, or eos where there is no bos (the end of the document before); an encoder-decoder from
config.json's `decoder_start_token_id` (T5, Switch: pad).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from moejax.errors import ConfigError, InputError

TOKENIZERS = ('bytes', 'sentencepiece', 'hub')  # data.tokenizer
# T5's ids: moejax's own tokenizers reserve them.
T5_PAD, T5_EOS, T5_UNK = 0, 1, 2
# A hub directory's tokenizer files, in the order they are preferred (transformers' fast
# tokenizers read tokenizer.json).
HUB_TOKENIZER_FILES = ('tokenizer.json', 'spiece.model', 'tokenizer.model')
HUB_TOKENIZER_CONFIGS = ('tokenizer_config.json', 'special_tokens_map.json',
                         'generation_config.json', 'config.json')


class Tokenizer:
  """What every tokenizer shares: its special ids (set by the subclass) and what follows from
  them."""
  vocab_size: int
  pad_id: int
  eos_id: int
  unk_id: int | None = None
  bos_id: int | None = None
  add_bos: bool = False  # documents start with bos
  decoder_start_id: int | None = None  # an encoder-decoder's first decoder input (hub config)

  def encode(self, text: str | bytes) -> np.ndarray:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def own_sentinels(self) -> list[int]:
    """Its `<extra_id_i>` ids, in order (none: moejax adds sentinels past the vocabulary)."""
    return []

  def sentinel_ids(self, count: int) -> np.ndarray:
    """Span corruption's `count` sentinel ids: sentinel i is the tokenizer's `<extra_id_i>`, or
    V + count - 1 - i (T5's layout: the top ids of a vocabulary extended by `count`)."""
    own = self.own_sentinels()
    if not own:
      return self.vocab_size + count - 1 - np.arange(count, dtype=np.int32)
    if count > len(own):
      raise ConfigError('num_sentinels', count, f'the tokenizer has {len(own)} sentinels '
                        '(<extra_id_i>)', 'data')
    return np.asarray(own[:count], np.int32)

  def added_vocab(self, sentinels: int) -> int:
    """Ids span corruption adds past the vocabulary: `sentinels` unless it has its own."""
    return 0 if self.own_sentinels() else sentinels

  def start_id(self, kind: str) -> int:
    """The decoder's first input: pad for moejax's own tokenizers and encoder-decoders (T5),
    bos (else eos) for a hub decoder LM."""
    if kind == 'encoder_decoder':
      return self.pad_id if self.decoder_start_id is None else self.decoder_start_id
    return self.pad_id

  def document(self, text: str | bytes) -> np.ndarray:
    """A document's ids as packed: [bos] + text + [eos]."""
    ids = [self.encode(text).astype(np.int32), np.array([self.eos_id], np.int32)]
    if self.add_bos and self.bos_id is not None:
      ids.insert(0, np.array([self.bos_id], np.int32))
    return np.concatenate(ids)

  def special_ids(self) -> set[int]:
    return {i for i in (self.pad_id, self.eos_id, self.unk_id, self.bos_id) if i is not None}

  def key(self) -> str:
    """Names the vocabulary (a split's token file is reused only for the same one)."""
    return type(self).__name__


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes, byte b as id b + 3 after T5's pad, eos and unk (ByT5's layout, V = 259), so on
  ASCII text one token is one character."""
  vocab_size = 256 + 3
  pad_id, eos_id, unk_id = T5_PAD, T5_EOS, T5_UNK

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode('utf-8') if isinstance(text, str) else text
    return np.frombuffer(data, np.uint8).astype(np.int32) + 3

  def decode(self, ids: Iterable[int]) -> str:
    """Text of the byte ids; reserved ids and ids past the bytes (sentinels) are skipped."""
    ids = np.asarray(list(ids), np.int64)
    ids = ids[(ids >= 3) & (ids < self.vocab_size)] - 3
    return bytes(ids.astype(np.uint8)).decode('utf-8', errors='replace')


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (a `.model` file, or one trained by `train_sentencepiece`); its ids are
  the model's own. `extra_ids`: T5's `<extra_id_i>` sentinels appended past its pieces
  (spiece.model of T5 and Switch: 100, extra_id_0 the highest)."""

  def __init__(self, model_proto: bytes, extra_ids: int = 0, specials: dict | None = None):
    import sentencepiece as spm
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.extra_ids = extra_ids
    self.vocab_size = self._sp.get_piece_size() + extra_ids
    own = lambda i: None if i < 0 else i
    ids = dict(pad=own(self._sp.pad_id()), eos=own(self._sp.eos_id()),
               unk=own(self._sp.unk_id()), bos=own(self._sp.bos_id()))
    ids.update({k: v for k, v in (specials or {}).items() if v is not None})
    self.eos_id, self.unk_id, self.bos_id = ids['eos'], ids['unk'], ids['bos']
    self.pad_id = ids['pad'] if ids['pad'] is not None else self.eos_id

  @classmethod
  def load(cls, path: str, **kwargs) -> SentencePieceTokenizer:
    with open(path, 'rb') as f:
      return cls(f.read(), **kwargs)

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode('utf-8') if isinstance(text, bytes) else text
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    pieces, specials = self._sp.get_piece_size(), self.special_ids()
    return self._sp.decode([int(i) for i in ids if i not in specials and 0 <= i < pieces])

  def own_sentinels(self) -> list[int]:
    return [self.vocab_size - 1 - i for i in range(self.extra_ids)]

  def key(self) -> str:
    digest = 'spm-' + hashlib.sha256(self.model_proto).hexdigest()[:16]
    return digest + (f'-{self.extra_ids}' if self.extra_ids else '')


class HubTokenizer(Tokenizer):
  """A `tokenizer.json` (the `tokenizers` library: any model, normalizer, pre-tokenizer and
  decoder it describes) with the special tokens named in `specials` ({'bos': token or None,
  'eos': ..., 'pad': ..., 'unk': ...}; None: from the file's own added special tokens)."""

  def __init__(self, json_text: str, specials: dict | None = None,
               add_bos: bool | None = None):
    import tokenizers
    self.json_text = json_text
    self._tok = tokenizers.Tokenizer.from_str(json_text)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    specials = specials or {}
    self.bos_id, self.eos_id = specials.get('bos'), specials.get('eos')
    self.unk_id, pad = specials.get('unk'), specials.get('pad')
    if self.eos_id is None:
      raise InputError('the tokenizer names no eos token (tokenizer_config.json eos_token, '
                       'generation_config.json eos_token_id or config.json eos_token_id)')
    self.pad_id = self.eos_id if pad is None else pad
    # Where the file's post-processor adds bos itself (Llama, Mixtral), documents start with it.
    self.add_bos = (self._adds_bos() if add_bos is None else add_bos)

  def _adds_bos(self) -> bool:
    if self.bos_id is None:
      return False
    ids = self._tok.encode('a', add_special_tokens=True).ids
    return bool(ids) and ids[0] == self.bos_id

  def start_id(self, kind: str) -> int:
    if kind == 'encoder_decoder':
      return super().start_id(kind)
    return self.eos_id if self.bos_id is None else self.bos_id

  def encode(self, text: str | bytes) -> np.ndarray:
    text = text.decode('utf-8') if isinstance(text, bytes) else text
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_with_specials(self, text: str) -> np.ndarray:
    """The ids transformers' tokenizer gives by default (its post-processor's specials)."""
    return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids if 0 <= i < self.vocab_size],
                            skip_special_tokens=True)

  def own_sentinels(self) -> list[int]:
    out = []
    while (i := self._tok.token_to_id(f'<extra_id_{len(out)}>')) is not None:
      out.append(i)
    return out

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def key(self) -> str:
    return 'hub-' + hashlib.sha256(self.json_text.encode()).hexdigest()[:16]


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
  return value.get('content') if isinstance(value, dict) else value


def _first_id(value) -> int | None:
  """An id as generation_config.json / config.json write it: an int, or a list (the first)."""
  if isinstance(value, list):
    return value[0] if value else None
  return value


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as error:
    raise InputError(f'{path} is not valid JSON ({error})') from None


def hub_specials(directory: str, token_id) -> dict[str, int | None]:
  """{'bos', 'eos', 'pad', 'unk': id or None} of a hub directory: the tokens tokenizer_config.json
  (then special_tokens_map.json) names, looked up with `token_id(token) -> id or None`, else the
  ids of generation_config.json, then config.json."""
  configs = {name: _read_json(os.path.join(directory, name)) for name in HUB_TOKENIZER_CONFIGS}
  out = {}
  for special in ('bos', 'eos', 'pad', 'unk'):
    found = None
    for name in ('tokenizer_config.json', 'special_tokens_map.json'):
      token = _token_text(configs[name].get(f'{special}_token'))
      if token is not None and found is None:
        found = token_id(token)
    for name in ('generation_config.json', 'config.json'):
      if found is None:
        found = _first_id(configs[name].get(f'{special}_token_id'))
    out[special] = found
  return out


def load_hub_tokenizer(path: str) -> Tokenizer:
  """The tokenizer of a hub directory (or of one tokenizer.json / .model file and the config files
  beside it): tokenizer.json, else spiece.model or tokenizer.model. InputError, naming the path,
  when it holds none."""
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.isdir(path):
    found = [os.path.join(path, f) for f in HUB_TOKENIZER_FILES
             if os.path.exists(os.path.join(path, f))]
    if not found:
      raise InputError(f'{path} holds no tokenizer ({", ".join(HUB_TOKENIZER_FILES)})')
    path = found[0]
  elif not os.path.exists(path):
    raise InputError(f'no tokenizer file {path}')
  settings = _read_json(os.path.join(directory, 'tokenizer_config.json'))
  model = _read_json(os.path.join(directory, 'config.json'))
  if path.endswith('.json'):
    with open(path, encoding='utf-8') as f:
      text = f.read()
    probe = HubTokenizer(text, {'eos': 0})  # only to look tokens up
    specials = hub_specials(directory, probe.token_id)
    tokenizer = HubTokenizer(text, specials, settings.get('add_bos_token'))
  else:
    import sentencepiece as spm
    with open(path, 'rb') as f:
      proto = f.read()
    processor = spm.SentencePieceProcessor(model_proto=proto)
    extra = int(settings.get('extra_ids', 100 if 'spiece' in os.path.basename(path) else 0))
    pieces = processor.get_piece_size()
    lookup = lambda token: _sp_token_id(processor, token, pieces, extra)
    tokenizer = SentencePieceTokenizer(proto, extra, hub_specials(directory, lookup))
    tokenizer.add_bos = bool(settings.get('add_bos_token', False))
  tokenizer.decoder_start_id = model.get('decoder_start_token_id')
  return tokenizer


def _sp_token_id(processor, token: str, pieces: int, extra: int) -> int | None:
  """A token's id in a SentencePiece model with T5's `extra` sentinels past its `pieces`."""
  if token.startswith('<extra_id_') and token.endswith('>'):
    return pieces + extra - 1 - int(token[len('<extra_id_'):-1])
  i = processor.piece_to_id(token)
  return i if processor.id_to_piece(i) == token else None


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> SentencePieceTokenizer:
  """Train a unigram SentencePiece vocabulary on `texts` (an iterable of documents), with T5's
  ids."""
  import sentencepiece as spm
  lines = (line for text in texts for line in text.splitlines() if line.strip())
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type='unigram',
      character_coverage=1.0, pad_id=T5_PAD, eos_id=T5_EOS, unk_id=T5_UNK, bos_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  return SentencePieceTokenizer(model.getvalue())


def make_tokenizer(kind: str, spm_model: str | None, vocab_size: int, train_texts,
                   cache_path: str | None = None, tokenizer_path: str | None = None):
  """'bytes'; 'hub' from `tokenizer_path` (a hub directory or a tokenizer.json); or
  'sentencepiece' from `spm_model` (a .model file) or trained on `train_texts()`.

  A trained vocabulary is written to `cache_path` (the run's work directory) and reused from
  there, so `eval` and `sample` see the vocabulary `train` used.
  """
  if kind == 'bytes':
    return ByteTokenizer()
  if kind == 'hub':
    if not tokenizer_path:
      raise ConfigError('tokenizer_path', tokenizer_path, "data.tokenizer='hub' needs a hub "
                        'directory or a tokenizer.json', 'data')
    return load_hub_tokenizer(tokenizer_path)
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


def tokenizer_for(data: Any, workdir: str | None):
  """The run's tokenizer. A SentencePiece vocabulary is trained once, by process 0, and written
  atomically to <workdir>/spm.model, which every process then reads; only training one reads
  the corpus (and imports TensorFlow)."""
  cache = os.path.join(workdir, 'spm.model') if workdir else None

  def train_texts():
    import tensorflow_datasets as tfds

    from moejax.data.sources import documents
    for text in tfds.as_numpy(documents(data, data.train_split)):
      yield text.decode('utf-8')

  def make():
    return make_tokenizer(data.tokenizer, data.spm_model, data.spm_vocab_size, train_texts, cache,
                          data.get('tokenizer_path'))

  if cache and data.tokenizer == 'sentencepiece':
    from moejax.distributed import on_lead
    on_lead(lambda: make() and None, 'train the SentencePiece vocabulary')
  return make()


def model_vocab_size(tokenizer, data: Any, task: str) -> int:
  """V: the tokenizer's vocabulary, plus the sentinels span corruption adds (none when the
  tokenizer has its own `<extra_id_i>`)."""
  added = tokenizer.added_vocab(data.num_sentinels) if task == 'span_corruption' else 0
  return tokenizer.vocab_size + added
