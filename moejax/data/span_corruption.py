"""T5 span corruption (Raffel et al. 2020, 3.1.4): noise spans of a packed example replaced by
sentinels in the encoder inputs; the decoder targets list each sentinel and the span it hid.

NumPy, one example at a time, its noise drawn from a generator the caller seeds (the training
stream seeds it with (seed, index of the element in the stream): `moejax.data.pipeline`).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def random_segments(total: int, num: int, rng: np.random.Generator) -> np.ndarray:
  """`total` split into `num` positive parts at random (T5's random_segmentation)."""
  cuts = np.sort(rng.choice(np.arange(1, total), num - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [total]]))


def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) for T5 span corruption of `length` tokens."""
  num_noise = int(np.clip(round(length * noise_density), 1, length - 1))
  num_spans = int(np.clip(round(num_noise / mean_span_length), 1, min(num_noise,
                                                                        length - num_noise)))
  return num_noise, num_spans


def span_corruption_lengths(length: int, noise_density: float,
                            mean_span_length: float) -> tuple[int, int]:
  """(M, L): encoder input and decoder target lengths after corrupting `length` tokens."""
  num_noise, num_spans = span_lengths(length, noise_density, mean_span_length)
  return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corrupt(tokens: np.ndarray, rng: np.random.Generator, noise_density: float,
                 mean_span_length: float, sentinels: np.ndarray,
                 eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """T5 span corruption of tokens [N] -> (inputs [M], targets [L]), both ending with `eos_id`.

  Noise spans are replaced by sentinels in the inputs; the targets list each sentinel followed by
  the span it replaced. `sentinels` [n]: sentinel i's id (`Tokenizer.sentinel_ids`: T5's
  `<extra_id_i>`, or the top ids of the vocabulary).
  """
  num_noise, num_spans = span_lengths(len(tokens), noise_density, mean_span_length)
  noise = random_segments(num_noise, num_spans, rng)
  keep = random_segments(len(tokens) - num_noise, num_spans, rng)
  inputs, targets, start = [], [], 0
  for i, (k, n) in enumerate(zip(keep, noise)):
    sentinel = int(sentinels[i])
    inputs += [*tokens[start:start + k], sentinel]
    targets += [sentinel, *tokens[start + k:start + k + n]]
    start += k + n
  return (np.array(inputs + [eos_id], np.int32), np.array(targets + [eos_id], np.int32))


def corrupted(example: dict[str, np.ndarray], rng: np.random.Generator, data: Any,
              sentinels: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
  """A whole packed LM example (no padding) -> the encoder-decoder example: inputs [M],
  input_mask [M], targets [L], weights [L] (`span_corruption_lengths`), every position real."""
  inputs, targets = span_corrupt(example['targets'], rng, data.noise_density,
                                 data.mean_span_length, sentinels, eos_id)
  return {'inputs': inputs, 'input_mask': np.ones(inputs.shape, np.float32),
          'targets': targets, 'weights': np.ones(targets.shape, np.float32)}
