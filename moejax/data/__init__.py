"""Data: TFDS datasets (local text files or any registered name), tokenizers, token streams
written once and memory-mapped, packing, span corruption, grain pipelines.

The only part of moejax that imports TensorFlow, and only when a pipeline name is first used
(`moejax.data.train_batches`, ...): the tokenizers (`moejax.data.tokenizers`) do not need it, so
sampling and the tokenizer ids load without it.
"""
import importlib
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads: no C++ info logs

from moejax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, make_tokenizer,
                                    model_vocab_size, tokenizer_for, train_sentencepiece)

# name -> the submodule that defines it; all but span_corruption import TensorFlow (datasets).
_WITH_TENSORFLOW = {
    'LocalText': 'local_text', 'local_text_builder': 'local_text',
    'dataset_name': 'sources', 'documents': 'sources', 'is_local': 'sources',
    'SplitTokens': 'tokens', 'packed': 'tokens', 'split_tokens': 'tokens', 'tokenize': 'tokens',
    'corrupted': 'span_corruption', 'span_corrupt': 'span_corruption',
    'span_corruption_lengths': 'span_corruption',
    'chars_per_token': 'pipeline', 'check_corpus': 'pipeline', 'eval_batches': 'pipeline',
    'train_batches': 'pipeline', 'train_stream': 'pipeline',
}


def __getattr__(name):
  if name not in _WITH_TENSORFLOW:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  try:
    module = importlib.import_module(f'{__name__}.{_WITH_TENSORFLOW[name]}')
  except ImportError as error:
    raise ImportError(f'moejax.data.{name} needs TensorFlow, tensorflow-datasets and grain '
                      f"({error}); install them with: pip install 'moejax[tf]' (grain has no "
                      'wheels for macOS on Intel)') from error
  return getattr(module, name)


__all__ = ['ByteTokenizer', 'SentencePieceTokenizer', 'make_tokenizer', 'model_vocab_size',
           'tokenizer_for', 'train_sentencepiece', *_WITH_TENSORFLOW]
