"""Sampling from a trained model, one token at a time.

With the cache (the default), the prompt is read once and each new token costs one position: the
decoder's attention keys and values, and each MoE layer's expert slots taken so far, are kept in
the model's 'cache' collection (`make_model(config, decode_length=L)`). Its logits equal those of
recomputing the whole window at every step (`tests/test_sampling.py`: to 1e-5, with tokens
dropped over capacity), for as long as the context fits in the window of the training length L;
when it is full, the cache is refilled from the last L / 2 tokens of the context. A run whose
`group_size` does not divide L (its routing groups span sequences) samples with each window as
one group: the group size of sampling is a decode-time choice (`_sampling_model`).
Without the cache (`cache=False`), every step recomputes a window of L tokens holding the last
L - 1 tokens of the context: one compiled forward serves every step, and causal attention and
causal routing make the logits at position n independent of the padding after it.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax.balancing import BIAS_COLLECTION


def _model_args(encoder, decoder_inputs, decoder_mask) -> tuple:
  """The model's positional inputs: the encoder's (inputs [1, L], mask [1, L]) first, or
  nothing for a decoder LM (`encoder` None)."""
  args = (decoder_inputs, decoder_mask)
  return args if encoder is None else (*encoder, *args)


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


def _sampling_model(model: nn.Module, length: int) -> nn.Module:
  """`model` as it samples one sequence in windows of `length`: routed in the training groups
  when `group_size` divides the window, else each window as one group. A training group that
  spans sequences (or cuts one short) cannot be formed from one sequence; a whole window keeps
  the capacity factor's slots per token, and the cached and uncached samplers agree."""
  group = model.config.group_size
  if group is None or length % group == 0:
    return model
  return type(model)(dataclasses.replace(model.config, group_size=None))


def generate(model: nn.Module, params, prompt: np.ndarray, num_tokens: int, length: int,
             temperature: float, seed: int, bias_state=None, cache: bool = True,
             eos_id: int | None = None) -> np.ndarray:
  """Up to `num_tokens` new token ids after `prompt` (decoder LM), or from the encoder reading
  `prompt` (encoder-decoder), stopping at the tokenizer's `eos_id` (None: never; the encoder's
  input ends with it). `length`: the window L. bias_state: the MoE layers'
  'balancing_bias_state' collection, for models with balancing biases. cache: decode with the
  KV cache (see the module's doc)."""
  model = _sampling_model(model, length)
  variables = {'params': params}
  if bias_state is not None:
    variables[BIAS_COLLECTION] = bias_state
  encoder_decoder = model.config.kind == 'encoder_decoder'
  inputs = None
  if encoder_decoder:  # (ids [1, L], mask [1, L]): the prompt, then eos, then padding
    source = np.asarray(prompt if eos_id is None else np.append(prompt, eos_id))[-length:]
    inputs = (np.pad(source, (0, length - len(source)))[None].astype(np.int32),
              (np.arange(length) < len(source))[None])
  context = [] if encoder_decoder else [int(t) for t in prompt]
  step = _cached_steps if cache else _window_steps
  out = []
  for i, token in enumerate(step(model, variables, inputs, context, length, temperature, seed)):
    if i == num_tokens or token == eos_id:
      break
    context.append(token)
    out.append(token)
  return np.asarray(out, np.int32)


def _window_steps(model, variables, inputs, context, length, temperature, seed):
  """Tokens, each from a window of L recomputed: [start, the last L - 1 tokens of the context]
  (start: `ModelConfig.decoder_start_id`, as in training), padded after it."""
  rng = jax.random.key(seed)
  for i in itertools.count():
    window = context[-(length - 1):]
    decoder_inputs = np.zeros((1, length), np.int32)
    decoder_inputs[0, :len(window) + 1] = [model.config.decoder_start_id, *window]
    yield int(_next_token(model, variables, inputs, decoder_inputs, len(window), temperature,
                          jax.random.fold_in(rng, i)))


def _cached_steps(model, variables, inputs, context, length, temperature, seed):
  """Tokens, each from one position fed to the decoding model; `context` grows as they are
  taken. The cache starts as [start, the last L - 1 tokens], and a full one is refilled with
  [start, the last L / 2 - 1] (start: `ModelConfig.decoder_start_id`)."""
  decoding = type(model)(model.config, decode_length=length)
  group = model.config.group_size or length
  rng, i, keep = jax.random.key(seed), 0, length - 1
  while True:
    cache = _empty_cache(decoding, inputs)
    fed = [model.config.decoder_start_id, *(context[-keep:] if context else [])]
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
  """Token ids of a prompt (bos first where the tokenizer starts documents with it); for span
  corruption, each '<X>' becomes the next of the tokenizer's sentinels."""
  tokenizer = run.tokenizer
  if run.config.task != 'span_corruption':
    return tokenizer.document(prompt)[:-1]  # without the document's eos
  pieces = prompt.split(SENTINEL)
  sentinels = tokenizer.sentinel_ids(run.config.data.num_sentinels)
  ids = []
  for i, piece in enumerate(pieces):
    if i:
      ids.append(int(sentinels[i - 1]))
    ids.extend(tokenizer.encode(piece))
  return np.asarray(ids, np.int32)


def sample_text(run, params, prompt: str, num_tokens: int, temperature: float,
                seed: int, bias_state=None, cache: bool = True) -> str:
  """Continue `prompt` (decoder), or fill its '<X>' spans (encoder-decoder; the generated
  sentinels are dropped from the text). bias_state: as in `evaluate`."""
  ids = generate(run.model, params, encode_prompt(run, prompt), num_tokens,
                 run.config.data.length, temperature, seed, bias_state, cache,
                 run.tokenizer.eos_id)
  return run.tokenizer.decode(ids)
