"""A batch as the models take it: the arrays of a batch, the model's positional inputs made from
them, and a batch of the right shapes to initialize (or trace) a model on.

A batch holds 'targets' and 'weights' [B, L] (padding 0), optionally 'loss_weights' [B, L], and
for an encoder-decoder 'inputs' and 'input_mask' [B, L_in].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.models import ModelConfig

Batch = dict[str, jax.Array]


def shift_right(targets: jax.Array, start_id: int = 0) -> jax.Array:
  """Decoder inputs [B, L]: the targets shifted one to the right, starting with `start_id`
  (`ModelConfig.decoder_start_id`: T5's pad 0, a hub decoder LM's bos)."""
  return jnp.pad(targets, ((0, 0), (1, 0)), constant_values=start_id)[:, :-1]


def model_inputs(config: ModelConfig, batch: Batch) -> tuple:
  """The model's positional inputs (before `deterministic`) from a batch."""
  decoder = (shift_right(batch['targets'], config.decoder_start_id), batch['weights'] > 0)
  if config.kind == 'decoder':
    return decoder
  return (batch['inputs'], batch['input_mask'] > 0, *decoder)


def loss_weights(batch: Batch) -> jax.Array:
  """[B, L]: which targets the loss counts; `batch['loss_weights']` when the batch has it (e.g. only
  a class label, see `moejax.train.finetune`), else the padding weights."""
  return batch.get('loss_weights', batch['weights'])


def dummy_batch(config: ModelConfig, batch_size: int, length: int,
                input_length: int | None = None) -> Batch:
  batch = {'targets': jnp.zeros((batch_size, length), jnp.int32),
           'weights': jnp.ones((batch_size, length), jnp.float32)}
  if config.kind == 'encoder_decoder':
    batch['inputs'] = jnp.zeros((batch_size, input_length or length), jnp.int32)
    batch['input_mask'] = jnp.ones((batch_size, input_length or length), jnp.float32)
  return batch
