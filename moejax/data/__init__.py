"""Data: TFDS datasets (local text files or any registered name), tokenizers, packing, span corruption.

The only part of moejax that imports TensorFlow.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads: no C++ info logs

from moejax.data.local_text import LocalText, local_text_builder
from moejax.data.pipeline import (chars_per_token, documents, eval_batches, model_vocab_size,
                                  pack, span_corrupt, span_corruption_lengths, tokenizer_for,
                                  train_batches)
from moejax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, make_tokenizer,
                                    train_sentencepiece)

__all__ = [
    'ByteTokenizer', 'LocalText', 'SentencePieceTokenizer', 'chars_per_token', 'documents',
    'eval_batches', 'local_text_builder', 'make_tokenizer', 'model_vocab_size', 'pack',
    'span_corrupt', 'span_corruption_lengths', 'tokenizer_for', 'train_batches',
    'train_sentencepiece',
]
