"""Sampling from a trained model, one token at a time.

With the cache (the default), the prompt is read once and each new token costs one position: the
decoder's attention keys and values, and each MoE layer's expert slots taken so far, are kept in
the model's 'cache' collection (`make_model(config, decode_length=L)`). Its logits equal those of
recomputing the whole window at every step (`tests/test_sampling.py`: to 1e-5, with tokens
dropped over capacity), for as long as the context fits in the window of the training length L;
when it is full, the cache is refilled from the last L / 2 tokens of the context.
Without the cache (`cache=False`), every step recomputes a window of L tokens holding the last
L - 1 tokens of the context: one compiled forward serves every step, and causal attention and
causal routing make the logits at position n independent of the padding after it.
"""
from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.data.tokenizers import EOS_ID, PAD_ID
from moejax.balancing import BIAS_COLLECTION


def _model_args(inputs, decoder_inputs, decoder_mask) -> tuple:
  """The model's positional inputs: the encoder's `inputs` (or None, a decoder LM) first."""
  args = (decoder_inputs, decoder_mask)
  return args if inputs is None else (inputs, inputs != PAD_ID, *args)


def _pick(logits: jax.Array, temperature, rng: jax.Array) -> jax.Array:
  """A token id from logits [V]: sampled at `temperature`, greedy at 0."""
  sampled = jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits))


@functools.partial(jax.jit, static_argnames=('model',))
def _next_token(model: nn.Module, variables, inputs, decoder_inputs, position, temperature, rng):
  """Sample the token after decoder_inputs[0, :position + 1]; inputs: the encoder's, or None."""
  decoder_mask = jnp.arange(decoder_inputs.shape[1])[None] <= position  # Shape: [1, L]
  args = _model_args(inputs, decoder_inputs, decoder_mask)
  logits = model.apply(variables, *args, True)[0, position]  # Shape: [V]
  return _pick(logits, temperature, rng)


@functools.partial(jax.jit, static_argnames=('model',))
def _decode(model: nn.Module, variables, cache, inputs, decoder_inputs, temperature, rng):
  """(the token after decoder_inputs [1, T], fed at the cache's position; the cache after)."""
  args = _model_args(inputs, decoder_inputs, jnp.ones(decoder_inputs.shape, jnp.bool_))
  logits, state = model.apply({**variables, 'cache': cache}, *args, True, mutable=['cache'])
  return _pick(logits[0, -1], temperature, rng), state['cache']


def _empty_cache(model: nn.Module, inputs):
  """The decoding model's cache at position 0 (zeros of the shapes `init` makes)."""
  args = _model_args(inputs, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.bool_))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, True))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _prefill_pieces(tokens: list[int], group: int) -> list[list[int]]:
  """`tokens` cut where a routing group of `group` positions ends (a decoding call of the MoE
  layers must stay within one group)."""
  return [tokens[i:i + group] for i in range(0, len(tokens), group)]


def generate(model: nn.Module, params, prompt: np.ndarray, num_tokens: int, length: int,
             temperature: float, seed: int, bias_state=None, cache: bool = True) -> np.ndarray:
  """`num_tokens` new token ids after `prompt` (decoder LM), or from the encoder reading
  `prompt` (encoder-decoder; it stops at EOS). `length`: the window L. bias_state: the MoE
  layers' 'balancing_bias_state' collection, for models with balancing biases. cache: decode
  with the KV cache (see the module's doc)."""
  variables = {'params': params}
  if bias_state is not None:
    variables[BIAS_COLLECTION] = bias_state
  encoder_decoder = model.config.kind == 'encoder_decoder'
  inputs = None
  if encoder_decoder:
    inputs = np.zeros((1, length), np.int32)
    source = np.append(prompt, EOS_ID)[-length:]
    inputs[0, :len(source)] = source
  context = [] if encoder_decoder else [int(t) for t in prompt]
  step = _cached_steps if cache else _window_steps
  out = []
  for i, token in enumerate(step(model, variables, inputs, context, length, temperature, seed)):
    if i == num_tokens or (encoder_decoder and token == EOS_ID):
      break
    context.append(token)
    out.append(token)
  return np.asarray(out, np.int32)


def _window_steps(model, variables, inputs, context, length, temperature, seed):
  """Tokens, each from a window of L recomputed: [PAD, the last L - 1 tokens of the context]."""
  rng = jax.random.key(seed)
  for i in itertools.count():
    window = context[-(length - 1):]  # decoder inputs: [PAD, window...], as in training
    decoder_inputs = np.zeros((1, length), np.int32)
    decoder_inputs[0, 1:len(window) + 1] = window
    yield int(_next_token(model, variables, inputs, decoder_inputs, len(window), temperature,
                          jax.random.fold_in(rng, i)))


def _cached_steps(model, variables, inputs, context, length, temperature, seed):
  """Tokens, each from one position fed to the decoding model; `context` grows as they are
  taken. The cache starts as [PAD, the last L - 1 tokens], and a full one is refilled with
  [PAD, the last L / 2 - 1]."""
  decoding = type(model)(model.config, decode_length=length)
  group = model.config.group_size or length
  rng, i, keep = jax.random.key(seed), 0, length - 1
  while True:
    cache = _empty_cache(decoding, inputs)
    fed = [PAD_ID, *context[-keep:]] if context else [PAD_ID]
    keep = max(length // 2 - 1, 1)
    for piece in _prefill_pieces(fed, group):
      token, cache = _decode(decoding, variables, cache, inputs, np.asarray([piece], np.int32),
                             temperature, jax.random.fold_in(rng, i))
    position = len(fed)
    while True:
      yield int(token)
      i += 1
      if position == length:
        break
      token, cache = _decode(decoding, variables, cache, inputs,
                             np.asarray([[context[-1]]], np.int32), temperature,
                             jax.random.fold_in(rng, i))
      position += 1


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
                seed: int, bias_state=None, cache: bool = True) -> str:
  """Continue `prompt` (decoder), or fill its '<X>' spans (encoder-decoder; the generated
  sentinels are dropped from the text). bias_state: as in `evaluate`."""
  ids = generate(run.model, params, encode_prompt(run, prompt), num_tokens,
                 run.config.data.length, temperature, seed, bias_state, cache)
  return run.tokenizer.decode(ids)
