"""Sampling from a trained model, one token at a time over a fixed-size window (no KV cache).

The window has the training length L, so one compiled forward serves every step; causal attention
and causal routing make the logits at position n independent of the padding after it.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.data.tokenizers import EOS_ID, PAD_ID
from moejax.balancing import BIAS_COLLECTION


@functools.partial(jax.jit, static_argnames=('model',))
def _next_token(model: nn.Module, variables, inputs, decoder_inputs, position, temperature, rng):
  """Sample the token after decoder_inputs[0, :position + 1]; inputs: the encoder's, or None."""
  decoder_mask = jnp.arange(decoder_inputs.shape[1])[None] <= position  # Shape: [1, L]
  args = (decoder_inputs, decoder_mask)
  if inputs is not None:
    args = (inputs, inputs != PAD_ID, *args)
  logits = model.apply(variables, *args, True)[0, position]  # Shape: [V]
  greedy = jnp.argmax(logits)
  sampled = jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, greedy)


def generate(model: nn.Module, params, prompt: np.ndarray, num_tokens: int, length: int,
             temperature: float, seed: int, bias_state=None) -> np.ndarray:
  """`num_tokens` new token ids after `prompt` (decoder LM), or from the encoder reading
  `prompt` (encoder-decoder; it stops at EOS). `length`: the window L. bias_state: the MoE
  layers' 'balancing_bias_state' collection, for models with balancing biases."""
  variables = {'params': params}
  if bias_state is not None:
    variables[BIAS_COLLECTION] = bias_state
  encoder_decoder = model.config.kind == 'encoder_decoder'
  inputs = None
  if encoder_decoder:
    inputs = np.zeros((1, length), np.int32)
    source = np.append(prompt, EOS_ID)[-length:]
    inputs[0, :len(source)] = source
  context = [] if encoder_decoder else list(prompt)
  out = []
  rng = jax.random.key(seed)
  for i in range(num_tokens):
    window = context[-(length - 1):]  # decoder inputs: [PAD, window...], as in training
    decoder_inputs = np.zeros((1, length), np.int32)
    decoder_inputs[0, 1:len(window) + 1] = window
    token = int(_next_token(model, variables, inputs, decoder_inputs, len(window), temperature,
                            jax.random.fold_in(rng, i)))
    if encoder_decoder and token == EOS_ID:
      break
    context.append(token)
    out.append(token)
  return np.asarray(out, np.int32)


SENTINEL = '<X>'


def encode_prompt(run, prompt: str) -> np.ndarray:
  """Token ids of a prompt; for span corruption, each '<X>' becomes the next sentinel id."""
  if run.config.task != 'span_corruption':
    return run.tokenizer.encode(prompt)
  ids = []
  for i, piece in enumerate(prompt.split(SENTINEL)):
    if i:
      ids.append(run.model_config.vocab_size - i)  # sentinel i - 1
    ids.extend(run.tokenizer.encode(piece))
  return np.asarray(ids, np.int32)


def sample_text(run, params, prompt: str, num_tokens: int, temperature: float,
                seed: int, bias_state=None) -> str:
  """Continue `prompt` (decoder), or fill its '<X>' spans (encoder-decoder; the generated
  sentinels are dropped from the text). bias_state: as in `evaluate`."""
  ids = generate(run.model, params, encode_prompt(run, prompt), num_tokens,
                 run.config.data.length, temperature, seed, bias_state)
  return run.tokenizer.decode(ids)
