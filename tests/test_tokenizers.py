"""Hub tokenizers: tokenizer.json of every kind (built here with the `tokenizers` library from the
repo's corpora), SentencePiece spiece.model, their special ids from the hub's config files, and
what the data pipeline and sampling take from them."""
import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from moejax import data
from moejax.data.tokenizers import (HubTokenizer, SentencePieceTokenizer, load_hub_tokenizer,
                                    train_sentencepiece)
from moejax.errors import ConfigError, InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ('The quick brown fox, 42 times.', 'Thé café à Noël: déjà vu.', '東京は晴れです。',
         'Rocket 🚀 and snake 🐍!')


def _corpus(chars: int = 60_000) -> list[str]:
  with open(os.path.join(REPO, 'data', 'tinyshakespeare.txt'), encoding='utf-8') as f:
    return f.read(chars).splitlines()


def _bpe() -> tokenizers.Tokenizer:
  """BPE over words split at spaces kept as '▁' (every character of TEXTS in its alphabet)."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(_corpus() + list(TEXTS) * 3, trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<unk>', '<s>', '</s>']))
  return tok


def _byte_level_bpe() -> tokenizers.Tokenizer:
  """GPT-2 / GPT-NeoX / Qwen style: BPE over the 256 bytes, no unknown token."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<|endoftext|>', '<|pad|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _sentencepiece_bpe() -> tokenizers.Tokenizer:
  """Llama / Mixtral style: '▁' for spaces, byte fallback for unseen characters, bos prepended
  by the post-processor."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<unk>', '<s>', '</s>']))
  layout = json.loads(tok.to_str())  # the byte tokens are plain vocabulary, as in Llama's file
  vocab = layout['model']['vocab']
  vocab.update({f'<0x{b:02X}>': len(vocab) + b for b in range(256)})
  tok = tokenizers.Tokenizer.from_str(json.dumps(layout))
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', tok.token_to_id('<s>'))])
  return tok


def _unigram() -> tokenizers.Tokenizer:
  """T5 style: Unigram over '▁'-marked words, pad 0, eos 1, unk 2, and `<extra_id_i>` sentinels."""
  tok = tokenizers.Tokenizer(models.Unigram())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(_corpus() + list(TEXTS) * 3, trainers.UnigramTrainer(
      vocab_size=400, special_tokens=['<pad>', '</s>', '<unk>'], unk_token='<unk>'))
  tok.add_special_tokens([f'<extra_id_{i}>' for i in range(9, -1, -1)])
  return tok


KINDS = {  # builder, the special tokens tokenizer_config.json names
    'bpe': (_bpe, dict(bos_token='<s>', eos_token='</s>', unk_token='<unk>')),
    'byte_level_bpe': (_byte_level_bpe, dict(eos_token='<|endoftext|>', pad_token='<|pad|>')),
    'sentencepiece_bpe': (_sentencepiece_bpe, dict(bos_token='<s>', eos_token='</s>',
                                                   unk_token='<unk>')),
    'unigram': (_unigram, dict(eos_token='</s>', pad_token='<pad>', unk_token='<unk>')),
}


def _hub_dir(tmp_path, kind: str) -> str:
  build, specials = KINDS[kind]
  directory = tmp_path / kind
  directory.mkdir()
  build().save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps(specials))
  return str(directory)


@pytest.fixture(scope='module', params=sorted(KINDS))
def hub(request, tmp_path_factory):
  """(kind, its hub directory, the loaded tokenizer)."""
  directory = _hub_dir(tmp_path_factory.mktemp('hub'), request.param)
  return request.param, directory, load_hub_tokenizer(directory)


def test_every_kind_round_trips_ascii_accents_cjk_and_emoji(hub):
  kind, _, tokenizer = hub
  assert isinstance(tokenizer, HubTokenizer)
  for text in TEXTS:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tokenizer.vocab_size
    assert tokenizer.decode(ids) == text, (kind, text)
  # Subwords: an English sentence takes fewer tokens than characters.
  assert len(tokenizer.encode(TEXTS[0])) < len(TEXTS[0])


def test_special_ids_come_from_tokenizer_config(hub):
  kind, directory, tokenizer = hub
  with open(os.path.join(directory, 'tokenizer.json')) as f:
    vocab = json.load(f)
  lookup = tokenizers.Tokenizer.from_str(json.dumps(vocab)).token_to_id
  named = KINDS[kind][1]
  assert tokenizer.eos_id == lookup(named['eos_token'])
  assert tokenizer.bos_id == (lookup(named['bos_token']) if 'bos_token' in named else None)
  assert tokenizer.unk_id == (lookup(named['unk_token']) if 'unk_token' in named else None)
  # Without a pad token, padding takes eos (padding is masked by weights, not by its id).
  pad = named.get('pad_token')
  assert tokenizer.pad_id == (lookup(pad) if pad else tokenizer.eos_id)
  # The decoder's first input: bos, else eos, for a decoder LM; pad for an encoder-decoder.
  assert tokenizer.start_id('decoder') == (tokenizer.bos_id if tokenizer.bos_id is not None
                                           else tokenizer.eos_id)
  assert tokenizer.start_id('encoder_decoder') == tokenizer.pad_id
  # Specials never come back as text.
  text = TEXTS[0]
  assert tokenizer.decode([tokenizer.eos_id, *tokenizer.encode(text), tokenizer.pad_id]) == text


def test_documents_start_with_bos_where_the_post_processor_adds_it(hub):
  kind, _, tokenizer = hub
  document = tokenizer.document(TEXTS[0])
  body = tokenizer.encode(TEXTS[0])
  if kind == 'sentencepiece_bpe':  # its TemplateProcessing prepends <s>, as Llama's does
    assert tokenizer.add_bos
    np.testing.assert_array_equal(document, [tokenizer.bos_id, *body, tokenizer.eos_id])
    np.testing.assert_array_equal(tokenizer.encode_with_specials(TEXTS[0]), document[:-1])
  else:
    assert not tokenizer.add_bos
    np.testing.assert_array_equal(document, [*body, tokenizer.eos_id])


def test_add_bos_token_in_tokenizer_config_overrides_the_post_processor(tmp_path):
  directory = _hub_dir(tmp_path, 'sentencepiece_bpe')
  settings = {**KINDS['sentencepiece_bpe'][1], 'add_bos_token': False}
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(settings, f)
  tokenizer = load_hub_tokenizer(directory)
  assert tokenizer.document('a')[0] != tokenizer.bos_id


def test_ids_fall_back_to_generation_config_then_config(tmp_path):
  directory = tmp_path / 'hub'
  directory.mkdir()
  _byte_level_bpe().save(str(directory / 'tokenizer.json'))
  (directory / 'generation_config.json').write_text(json.dumps({'eos_token_id': [1, 0]}))
  (directory / 'config.json').write_text(json.dumps({'bos_token_id': 0, 'eos_token_id': 0}))
  tokenizer = load_hub_tokenizer(str(directory / 'tokenizer.json'))
  assert (tokenizer.eos_id, tokenizer.bos_id) == (1, 0)  # generation_config's first eos


def test_a_tokenizer_without_eos_is_refused_naming_where_it_looks(tmp_path):
  directory = tmp_path / 'hub'
  directory.mkdir()
  _bpe().save(str(directory / 'tokenizer.json'))
  with pytest.raises(InputError, match='names no eos token'):
    load_hub_tokenizer(str(directory))
  with pytest.raises(InputError, match='holds no tokenizer'):
    load_hub_tokenizer(str(tmp_path))


def test_span_corruption_uses_the_tokenizers_own_sentinels(tmp_path):
  tokenizer = load_hub_tokenizer(_hub_dir(tmp_path, 'unigram'))
  lookup = lambda i: tokenizer.token_id(f'<extra_id_{i}>')
  np.testing.assert_array_equal(tokenizer.sentinel_ids(10), [lookup(i) for i in range(10)])
  assert tokenizer.added_vocab(10) == 0  # the model's vocabulary is the tokenizer's
  with pytest.raises(ConfigError, match='data.num_sentinels=11 is invalid'):
    tokenizer.sentinel_ids(11)
  inputs, targets = data.span_corrupt(np.arange(20, 84, dtype=np.int32),
                                      np.random.default_rng(0), 0.15, 3.0,
                                      tokenizer.sentinel_ids(10), tokenizer.eos_id)
  assert targets[0] == lookup(0) and inputs[-1] == targets[-1] == tokenizer.eos_id


def test_moejax_own_tokenizers_keep_t5_ids_and_add_sentinels_past_the_vocabulary():
  tokenizer = data.ByteTokenizer()
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.bos_id) == (0, 1, 2, None)
  np.testing.assert_array_equal(tokenizer.sentinel_ids(3), [261, 260, 259])
  assert tokenizer.added_vocab(3) == 3 and tokenizer.start_id('decoder') == 0


def test_spiece_model_with_t5_extra_ids(tmp_path):
  """A T5 / Switch hub directory: spiece.model (pad 0, eos 1, unk 2) and 100 `<extra_id_i>`
  appended past its pieces, extra_id_0 the highest, as T5Tokenizer numbers them."""
  trained = train_sentencepiece(_corpus(30_000), 300)
  (tmp_path / 'spiece.model').write_bytes(trained.model_proto)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'eos_token': '</s>', 'pad_token': '<pad>', 'unk_token': '<unk>', 'extra_ids': 100}))
  (tmp_path / 'config.json').write_text(json.dumps({'decoder_start_token_id': 0}))
  tokenizer = load_hub_tokenizer(str(tmp_path))
  assert isinstance(tokenizer, SentencePieceTokenizer)
  pieces = trained.vocab_size
  assert tokenizer.vocab_size == pieces + 100
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
  np.testing.assert_array_equal(tokenizer.sentinel_ids(3), [pieces + 99, pieces + 98, pieces + 97])
  assert tokenizer.start_id('encoder_decoder') == 0
  assert tokenizer.decode(tokenizer.encode('To be, or not to be')) == 'To be, or not to be'


def test_a_split_is_tokenized_with_a_hub_tokenizer(tmp_path):
  tokenizer = load_hub_tokenizer(_hub_dir(tmp_path, 'sentencepiece_bpe'))
  split = data.tokenize(TEXTS[:2], tokenizer)
  expected = np.concatenate([tokenizer.document(t) for t in TEXTS[:2]])
  np.testing.assert_array_equal(split.tokens, expected)
  assert split.tokens[0] == tokenizer.bos_id
  example = data.packed(split.tokens, len(split.tokens) + 3, 0, tokenizer.pad_id)
  assert list(example['targets'][-3:]) == [tokenizer.pad_id] * 3
  assert example['weights'].sum() == len(split.tokens)


@pytest.mark.slow
def test_train_from_scratch_with_any_tokenizer_json(tmp_path, tfds_dir, capsys):
  """`moejax train` with data.tokenizer='hub': the model's vocabulary is the tokenizer's, the
  corpus is packed with its eos (and bos), and sampling decodes with it."""
  from helpers import SMOKE_CONFIG, run_cli
  directory = _hub_dir(tmp_path, 'byte_level_bpe')
  tokenizer = load_hub_tokenizer(directory)
  workdir = tmp_path / 'run'
  status, out, err = run_cli(
      capsys, 'train', '--config', os.path.join(REPO, SMOKE_CONFIG), '--workdir', workdir,
      f'--config.data.data_dir={tfds_dir}', '--config.data.tokenizer=hub',
      f'--config.data.tokenizer_path={os.path.join(directory, "tokenizer.json")}',
      '--config.train.num_steps=2', '--config.sample.num_tokens=4')
  assert status == 0, err
  with open(workdir / 'config.json') as f:
    saved = json.load(f)
  assert saved['data']['tokenizer_path'] == os.path.join(directory, 'tokenizer.json')
  from moejax.train.config import saved_config
  from moejax.train.run import open_run
  run = open_run(saved_config(str(workdir)), str(workdir))
  assert run.model_config.vocab_size == tokenizer.vocab_size == 400
  assert run.model_config.decoder_start_id == tokenizer.eos_id  # no bos: the previous eos
  tokens = run.tokens('train').tokens
  assert (np.asarray(tokens) == tokenizer.eos_id).sum() >= 1
