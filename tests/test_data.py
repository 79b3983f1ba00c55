"""Data: the local TFDS builder, tfds.load by name, tokenizers, packing, span corruption, order."""
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import REPO, smoke_config
from moejax import data
from moejax.data.tokenizers import EOS_ID, PAD_ID

TIMEMACHINE = os.path.join(REPO, 'data', 'timemachine.txt')


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  return smoke_config(tmp_path_factory.mktemp('tfds'))


def _texts(config, split):
  return [t.decode('utf-8') for t in tfds.as_numpy(data.documents(config.data, split))]


def test_local_builder_splits_each_file_90_10_by_characters(config):
  with open(TIMEMACHINE, encoding='utf-8') as f:
    text = f.read()
  cut = int(len(text) * 0.9)
  assert _texts(config, 'train') == [text[:cut]]
  assert _texts(config, 'validation') == [text[cut:]]


def test_a_directory_is_one_document_per_file(config, tmp_path):
  for name, text in (('a.txt', 'first file ' * 20), ('b.txt', 'second file ' * 20)):
    (tmp_path / name).write_text(text)
  config = config.copy_and_resolve_references()
  config.data.source = str(tmp_path)
  train = _texts(config, 'train')
  assert len(train) == 2 and train[0].startswith('first') and train[1].startswith('second')


def test_registered_name_goes_through_tfds_load(config):
  # The prepared local builder is a registered TFDS dataset: load it by name, as `c4/en` would be.
  builder = data.local_text_builder(config.data.source, 0.1, config.data.data_dir)
  by_name = config.copy_and_resolve_references()
  by_name.data.source = f'local_text/{builder.builder_config.name}'
  assert _texts(by_name, 'validation') == _texts(config, 'validation')


def test_missing_source_is_a_clear_error(config):
  bad = config.copy_and_resolve_references()
  bad.data.source = 'no_such_dataset_xyz'
  with pytest.raises(Exception, match='no_such_dataset_xyz'):
    data.documents(bad.data, 'train')


def test_byte_tokenizer_round_trip():
  tokenizer = data.ByteTokenizer()
  ids = tokenizer.encode('Thé end.')
  assert ids.min() >= 3 and tokenizer.vocab_size == 259
  assert len(ids) == len('Thé end.'.encode('utf-8'))
  assert tokenizer.decode([*ids, EOS_ID, PAD_ID]) == 'Thé end.'


def test_sentencepiece_trains_on_the_corpus_and_round_trips(config, tmp_path):
  spm_config = config.copy_and_resolve_references()
  spm_config.data.update(tokenizer='sentencepiece', spm_vocab_size=300)
  tokenizer = data.tokenizer_for(spm_config.data, str(tmp_path))
  assert 250 <= tokenizer.vocab_size <= 300
  sentence = 'The Time Traveller was expounding a recondite matter to us.'
  ids = tokenizer.encode(sentence)
  assert len(ids) < len(sentence) / 2  # subwords, not characters
  assert tokenizer.decode(ids) == sentence
  # The trained vocabulary is cached in the workdir and reloaded, as a .model file would be.
  reloaded = data.SentencePieceTokenizer.load(str(tmp_path / 'spm.model'))
  np.testing.assert_array_equal(reloaded.encode(sentence), ids)


def test_pack_concatenates_documents_with_eos_and_pads_the_tail():
  docs = [np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)]
  tokens = tf.data.Dataset.from_generator(lambda: (np.append(d, EOS_ID) for d in docs),
                                          output_signature=tf.TensorSpec([None], tf.int32))
  examples = list(tfds.as_numpy(data.pack(tokens, 4)))
  np.testing.assert_array_equal([e['targets'] for e in examples], [[5, 6, 7, 1], [8, 9, 1, 0]])
  np.testing.assert_array_equal([e['weights'] for e in examples], [[1, 1, 1, 1], [1, 1, 1, 0]])


def _first_batches(config, seed, n=3, start=0):
  batches = data.train_batches(config.data, data.ByteTokenizer(), 'lm', 8, seed, start=start)
  return [b['targets'] for b in itertools.islice(batches, n)]


def test_same_seed_same_examples_other_seed_other_examples(config):
  a, b, c = _first_batches(config, 0), _first_batches(config, 0), _first_batches(config, 1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # Shuffled, not in file order: the first example is not the start of the book.
  text = data.ByteTokenizer().decode(a[0][0])
  with open(TIMEMACHINE, encoding='utf-8') as f:
    assert not f.read().startswith(text)


def test_start_skips_exactly_the_consumed_batches(config):
  """A resumed run continues with the batches an uninterrupted run would have seen."""
  np.testing.assert_array_equal(_first_batches(config, 0, n=5)[3:],
                                _first_batches(config, 0, n=2, start=3))


def test_eval_batches_cover_the_split_once_in_order(config):
  batches = data.eval_batches(config.data, data.ByteTokenizer(), 'lm', 16)
  targets = np.concatenate([b['targets'] for b in batches])
  weights = np.concatenate([b['weights'] for b in batches])
  text = data.ByteTokenizer().decode(targets[weights > 0].ravel())
  assert text == _texts(config, 'validation')[0]
  assert {len(b['targets']) for b in batches} == {16}


def test_span_corruption_hides_spans_behind_sentinels():
  tokens = np.arange(3, 3 + 64, dtype=np.int32)
  inputs, targets = data.span_corrupt(tokens, np.random.default_rng(0), 0.15, 3.0, 200)
  assert (len(inputs), len(targets)) == data.span_corruption_lengths(64, 0.15, 3.0)
  assert inputs[-1] == targets[-1] == EOS_ID
  # Putting each sentinel's span back into the inputs gives the original tokens.
  spans, current = {}, None
  for t in targets[:-1]:
    if t >= 200 - 100:
      current = spans.setdefault(t, [])
    else:
      current.append(t)
  restored = [x for t in inputs[:-1] for x in (spans[t] if t in spans else [t])]
  np.testing.assert_array_equal(restored, tokens)
  assert sum(map(len, spans.values())) == round(64 * 0.15)
  other, _ = data.span_corrupt(tokens, np.random.default_rng(1), 0.15, 3.0, 200)
  assert not np.array_equal(inputs, other)


def test_span_corruption_batches_for_the_encoder_decoder(config):
  tokenizer = data.ByteTokenizer()
  batches = data.train_batches(config.data, tokenizer, 'span_corruption', 4, seed=0)
  batch = next(batches)
  inputs_len, targets_len = data.span_corruption_lengths(32, 0.15, 3.0)
  assert batch['inputs'].shape == (4, inputs_len) and batch['targets'].shape == (4, targets_len)
  vocab = data.model_vocab_size(tokenizer, config.data, 'span_corruption')
  assert vocab == 259 + 100 and batch['targets'][:, 0].min() >= 259  # starts with a sentinel
  assert batch['input_mask'].all() and batch['weights'].all()
