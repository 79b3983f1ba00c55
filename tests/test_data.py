"""Data: the local TFDS builder, tfds.load by name, tokenizers, token streams, packing, span
corruption, the order of the grain stream and its resumption."""
import itertools
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from helpers import REPO, smoke_config
from moejax import data
from moejax.data.pipeline import READ_OPTIONS
from moejax.data.tokenizers import ByteTokenizer

BYTES = ByteTokenizer()
EOS_ID, PAD_ID = BYTES.eos_id, BYTES.pad_id

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


def test_packed_concatenates_documents_with_eos_and_pads_the_tail():
  tokens = data.tokenize(['\x02\x03\x04', '\x05\x06'], data.ByteTokenizer()).tokens
  np.testing.assert_array_equal(tokens, [5, 6, 7, EOS_ID, 8, 9, EOS_ID])
  examples = [data.packed(tokens, 4, i, PAD_ID) for i in range(2)]
  np.testing.assert_array_equal([e['targets'] for e in examples], [[5, 6, 7, 1], [8, 9, 1, 0]])
  np.testing.assert_array_equal([e['weights'] for e in examples], [[1, 1, 1, 1], [1, 1, 1, 0]])


@pytest.fixture(scope='module')
def train_tokens(config, tmp_path_factory):
  return data.split_tokens(config.data, 'train', data.ByteTokenizer(),
                           str(tmp_path_factory.mktemp('tokens'))).tokens


def _batches(config, tokens, seed, n, rows=slice(0, 8), state=None, task='lm'):
  batches = data.train_batches(tokens, config.data, task, BYTES, 8, seed, rows, state)
  return [b for b in itertools.islice(batches, n)], batches.get_state()


def test_the_split_is_tokenized_once_and_memory_mapped(config, tmp_path):
  first = data.split_tokens(config.data, 'validation', data.ByteTokenizer(), str(tmp_path))
  assert isinstance(first.tokens, np.memmap) and first.chars == len(_texts(config, 'validation')[0])
  files = sorted(os.listdir(tmp_path))
  assert [f.rsplit('.', 1)[1] for f in files] == ['json', 'npy']
  again = data.split_tokens(config.data, 'validation', data.ByteTokenizer(), str(tmp_path))
  np.testing.assert_array_equal(again.tokens, first.tokens)
  assert sorted(os.listdir(tmp_path)) == files  # read back, not written again
  other = data.split_tokens(config.data, 'train', data.ByteTokenizer(), str(tmp_path))
  assert len(os.listdir(tmp_path)) == 4 and len(other.tokens) > len(first.tokens)


def test_same_seed_same_examples_other_seed_other_examples(config, train_tokens):
  a, b, c = (_batches(config, train_tokens, seed, 3)[0] for seed in (0, 0, 1))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['targets'], y['targets'])
  assert not np.array_equal(a[0]['targets'], c[0]['targets'])
  # Shuffled, not in file order: the first example is not the start of the book.
  text = data.ByteTokenizer().decode(a[0]['targets'][0])
  with open(TIMEMACHINE, encoding='utf-8') as f:
    assert not f.read().startswith(text)


def test_an_epoch_holds_every_example_once_and_the_next_is_reshuffled(config):
  tokens = np.arange(3, 3 + 32 * 10, dtype=np.int32)  # 10 whole examples of 32 tokens
  stream = data.train_stream(tokens, config.data, 'lm', BYTES, seed=0)
  first = [int(stream[i]['targets'][0]) for i in range(10)]
  second = [int(stream[i]['targets'][0]) for i in range(10, 20)]
  assert sorted(first) == sorted(second) == list(range(3, 3 + 320, 32))
  assert first != second


@pytest.mark.parametrize('task', ['lm', 'span_corruption'])
def test_resuming_from_the_saved_state_gives_the_uninterrupted_batches(config, train_tokens, task):
  """A resumed run continues with the batches an uninterrupted run would have seen."""
  uninterrupted, _ = _batches(config, train_tokens, 0, 5, task=task)
  _, state = _batches(config, train_tokens, 0, 3, task=task)
  assert state == {'next_index': 3}
  resumed, _ = _batches(config, train_tokens, 0, 2, state=state, task=task)
  for a, b in zip(uninterrupted[3:], resumed):
    assert a.keys() == b.keys()
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])


class _CountingTokens:
  """A token stream that counts the slices read from it."""

  def __init__(self, tokens):
    self.tokens, self.reads = tokens, 0

  def __len__(self):
    return len(self.tokens)

  def __getitem__(self, index):
    self.reads += 1
    return self.tokens[index]


def _resume_cost(config, train_tokens, step):
  """(seconds, examples read) to restore the iterator at `step` and read its first batch."""
  counting = _CountingTokens(train_tokens)
  start = time.perf_counter()
  batches = data.train_batches(counting, config.data, 'lm', BYTES, 8, 0, slice(0, 8),
                               {'next_index': step})
  next(batches)
  return time.perf_counter() - start, counting.reads


def test_resuming_at_step_10000_costs_what_resuming_at_step_10_does(config, train_tokens):
  """O(1): the restored iterator reads the rows of the batches it returns (and of the few it
  prefetches), never the ones before; a replay would read 80,000 examples to reach 10,000.
  The reads are the guarantee; the times (a few ms each, so noisy on a shared machine) are
  compared by median with room for noise: a replay would cost about 1,000 times more."""
  most = 8 * (1 + READ_OPTIONS.prefetch_buffer_size)
  costs = {10: [], 10_000: []}
  for _ in range(9):  # interleaved, so both see the same load
    for step in costs:
      seconds, reads = _resume_cost(config, train_tokens, step)
      assert 8 <= reads <= most
      costs[step].append(seconds)
  assert np.median(costs[10_000]) < 5 * np.median(costs[10])


def test_each_process_reads_its_own_rows_of_the_global_batch(config, train_tokens):
  whole, _ = _batches(config, train_tokens, 0, 4)
  halves = [_batches(config, train_tokens, 0, 4, rows=rows)[0]
            for rows in (slice(0, 4), slice(4, 8))]
  for step in range(4):
    np.testing.assert_array_equal(
        np.concatenate([h[step]['targets'] for h in halves]), whole[step]['targets'])


def test_eval_batches_cover_the_split_once_in_order(config, tmp_path):
  tokens = data.split_tokens(config.data, 'validation', data.ByteTokenizer(), None).tokens
  batches = data.eval_batches(tokens, config.data, 'lm', BYTES, 16)
  targets = np.concatenate([b['targets'] for b in batches])
  weights = np.concatenate([b['weights'] for b in batches])
  text = data.ByteTokenizer().decode(targets[weights > 0].ravel())
  assert text == _texts(config, 'validation')[0]
  assert {len(b['targets']) for b in batches} == {16}


def test_span_corruption_hides_spans_behind_sentinels():
  tokens = np.arange(3, 3 + 64, dtype=np.int32)
  sentinels = 199 - np.arange(100)  # T5's layout for V = 100 + 100 sentinels: 199, 198, ...
  inputs, targets = data.span_corrupt(tokens, np.random.default_rng(0), 0.15, 3.0, sentinels,
                                      EOS_ID)
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
  other, _ = data.span_corrupt(tokens, np.random.default_rng(1), 0.15, 3.0, sentinels, EOS_ID)
  assert not np.array_equal(inputs, other)


def test_span_corruption_batches_for_the_encoder_decoder(config, train_tokens):
  tokenizer = data.ByteTokenizer()
  vocab = data.model_vocab_size(tokenizer, config.data, 'span_corruption')
  batch = _batches(config, train_tokens, 0, 1, rows=slice(0, 4), task='span_corruption')[0][0]
  inputs_len, targets_len = data.span_corruption_lengths(32, 0.15, 3.0)
  assert batch['inputs'].shape == (4, inputs_len) and batch['targets'].shape == (4, targets_len)
  assert vocab == 259 + 100 and batch['targets'][:, 0].min() >= 259  # starts with a sentinel
  assert batch['input_mask'].all() and batch['weights'].all()


DATA_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data_worker.py')


def _data_worker(workdir, data_dir, *args):
  return subprocess.Popen([sys.executable, DATA_WORKER, '--workdir', str(workdir), '--data-dir',
                           str(data_dir), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _data_result(process):
  try:
    out, err = process.communicate(timeout=240)
  finally:
    process.kill()
  assert process.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_read_their_halves_of_the_batches_and_resume_alike(tfds_dir, tmp_path):
  """2 processes (jax.distributed on 127.0.0.1): process 0 alone trains the vocabulary and
  tokenizes the split in the shared work directory; each reads its half of every batch, and
  the halves make the 1-process batches; resumed at batch 3, each reads what it would have."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = str(s.getsockname()[1])
  workers = [_data_worker(tmp_path / 'two', tfds_dir, '--num-processes', '2', '--process-id',
                          str(i), '--port', port) for i in range(2)]
  reference = _data_result(_data_worker(tmp_path / 'one', tfds_dir))
  halves = [_data_result(w) for w in workers]
  assert [h['rows'] for h in halves] == [[0, 4], [4, 8]] and reference['rows'] == [0, 8]
  assert halves[0]['vocabulary'] == halves[1]['vocabulary'] == reference['vocabulary']
  assert sorted(os.listdir(tmp_path / 'two')) == ['spm.model', 'tokens']
  assert len(os.listdir(tmp_path / 'two' / 'tokens')) == 2  # one .npy and its .json
  for result in (reference, *halves):
    assert result['state'] == {'next_index': 3}
    assert result['resumed'] == result['uninterrupted'][3:]
  for step, batch in enumerate(reference['uninterrupted']):
    assert halves[0]['uninterrupted'][step] + halves[1]['uninterrupted'][step] == batch
