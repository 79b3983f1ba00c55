"""Pre-norm Transformer blocks with dense or MoE FFNs: a decoder-only LM and a T5 encoder-decoder.

Axis legend (DESIGN.md): B batch, L (query) length, M key length, D model width, H heads,
A head width, V vocabulary, F FFN width. Masks are bool, True on real tokens; they are passed
explicitly (never guessed from token ids here) and reach every MoE layer as its padding mask.

A stack of blocks is a repeat of one *unit* of `config.stack_period(...)` blocks (the MoE layout
repeats with that period), so `nn.scan` (config.scan_layers) scans over units and still mixes
dense and sparse blocks; `nn.remat` (config.remat) rematerializes each unit. An encoder-decoder's
decoder may have its own depth and period (`num_decoder_layers`, `decoder_moe_every`), and
`dense_layers` keeps chosen blocks dense (unscanned stacks only).

Params are stored in `config.param_dtype` (the MoE routers' in float32) and cast to the compute
dtype `config.dtype` where they are used; attention softmax and output logits are float32.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.experts import ACTIVATIONS
from moejax.balancing import BIAS_COLLECTION
from moejax.intermediates import DECISIONS
from moejax.models.config import ModelConfig
from moejax.models.mla import LatentAttention
from moejax.models.rotary import rotary


def relative_bucket(relative: jax.Array, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> jax.Array:
  """T5's bucket of each key-minus-query offset: exact for small offsets, log-spaced beyond."""
  bucket = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    bucket += (relative > 0) * num_buckets
    distance = jnp.abs(relative)
  else:
    distance = jnp.maximum(-relative, 0)
  exact = num_buckets // 2
  log_bucket = exact + (jnp.log(jnp.maximum(distance, 1) / exact) / math.log(max_distance / exact)
                        * (num_buckets - exact)).astype(jnp.int32)
  log_bucket = jnp.minimum(log_bucket, num_buckets - 1)
  return bucket + jnp.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
  """T5 relative position bias [1, H, L, M], shared by all blocks of a stack."""
  config: ModelConfig
  bidirectional: bool

  @nn.compact
  def __call__(self, query_length: int, key_length: int,
               query_start: jax.Array | int = 0) -> jax.Array:
    """Queries at positions query_start ... + query_length - 1, keys at 0 ... key_length - 1."""
    cfg = self.config
    queries = query_start + jnp.arange(query_length)
    relative = jnp.arange(key_length)[None, :] - queries[:, None]  # Shape: [L, M]
    buckets = relative_bucket(relative, self.bidirectional, cfg.relative_buckets,
                              cfg.relative_max_distance)
    table = self.param('rel_embedding', nn.initializers.normal(0.1),
                       (cfg.relative_buckets, cfg.num_heads), cfg.storage_dtype)  # [buckets, H]
    bias = table[buckets].astype(jnp.float32)  # added to float32 logits; Shape: [L, M, H]
    return jnp.transpose(bias, (2, 0, 1))[None]  # Shape: [1, H, L, M]


def rms_norm(config: ModelConfig, name: str, axes: tuple[int, ...] = (-1,)) -> nn.RMSNorm:
  """RMSNorm over `axes` (a scale per feature of them), epsilon `config.norm_eps`."""
  return nn.RMSNorm(epsilon=config.norm_eps, dtype=config.compute_dtype,
                    param_dtype=config.storage_dtype, reduction_axes=axes, feature_axes=axes,
                    name=name)


class Attention(nn.Module):
  """Multi-head attention with `config.kv_heads` key/value heads (grouped-query attention when
  fewer than the H query heads: each serves H / kv_heads consecutive query heads); rotary
  positions on q and k when `use_rotary`.

  With `decode_length`, causal self-attention over a cache: x holds the tokens at positions
  start ... start + L - 1 of sequences of decode_length; their keys and values are written into
  the 'cache' collection ('cached_key', 'cached_value' [B, decode_length, kv_heads, A]) and
  each query attends to the cached keys up to its own position (`mask` is not used). With a
  sliding `window` the cache is a ring of min(window, decode_length) slots (`_ring_cached`).
  `config.attention_sinks` adds a learned logit per head ('sinks' [H]) to each softmax's
  denominator, a key that every query sees and that gives nothing (gpt-oss).
  """
  config: ModelConfig
  use_rotary: bool = False
  decode_length: int | None = None
  window: int | None = None  # a causal query's last `window` positions (the mask says so)

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array | None,
               bias: jax.Array | None, start: jax.Array | int = 0) -> jax.Array:
    """x [B, L, D], kv [B, M, D], mask [B, 1, L, M] (True: attend), bias [1, H, L, M] or None;
    start: the position of x[:, 0] (decoding)."""
    cfg = self.config
    dense = lambda heads, name: nn.DenseGeneral(
        (heads, cfg.attention_head_dim), use_bias=cfg.attention_bias, dtype=cfg.compute_dtype,
        param_dtype=cfg.storage_dtype, name=name)
    q = dense(cfg.num_heads, 'query')(x)  # Shape: [B, L, H, A]
    k, v = dense(cfg.kv_heads, 'key')(kv), dense(cfg.kv_heads, 'value')(kv)  # [B, M, KV, A]
    if cfg.qk_norm or cfg.qk_head_norm:
      axes = (-1,) if cfg.qk_head_norm else (-2, -1)  # each head's A features, or all H * A
      q, k = rms_norm(cfg, 'query_norm', axes)(q), rms_norm(cfg, 'key_norm', axes)(k)
    if self.use_rotary:
      q, k = rotary(q, cfg, start), rotary(k, cfg, start)
    if self.decode_length is not None and self.window is not None:
      k, v, mask = self._ring_cached(k, v, start)  # Shapes: [B, M, KV, A], [1, 1, L, M]
    elif self.decode_length is not None:
      k, v, mask = self._cached(k, v, start)  # Shapes: [B, decode_length, KV, A], [1, 1, L, M]
    group = cfg.num_heads // cfg.kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)  # Shapes: [B, M, H, A]
    logits = jnp.einsum('blha,bmha->bhlm', q, k).astype(jnp.float32)
    if cfg.scaled_attention:
      logits = logits / math.sqrt(cfg.attention_head_dim)
    if bias is not None:
      logits = logits + bias
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)  # Shape: [B, H, L, M]
    if cfg.attention_sinks:
      sinks = self.param('sinks', nn.initializers.zeros, (cfg.num_heads,), cfg.storage_dtype)
      probs = softmax_with_sinks(logits, sinks.astype(jnp.float32)).astype(cfg.compute_dtype)
    else:
      probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
    out = jnp.einsum('bhlm,bmha->blha', probs, v)  # Shape: [B, L, H, A]
    return nn.DenseGeneral(cfg.model_dim, axis=(-2, -1), use_bias=cfg.attention_out_bias,
                           dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                           name='out')(out)  # Shape: [B, L, D]

  def _cached(self, k: jax.Array, v: jax.Array, start: jax.Array | int):
    """Write k, v [B, L, KV, A] at `start` into the cache; (every cached key and value [B, M, KV,
    A], M = decode_length, and the mask [1, 1, L, M] of the keys at or before each query)."""
    shape = (k.shape[0], self.decode_length, *k.shape[2:])
    keys = self.variable('cache', 'cached_key', jnp.zeros, shape, k.dtype)
    values = self.variable('cache', 'cached_value', jnp.zeros, shape, v.dtype)
    keys.value = jax.lax.dynamic_update_slice(keys.value, k, (0, start, 0, 0))
    values.value = jax.lax.dynamic_update_slice(values.value, v, (0, start, 0, 0))
    queries = start + jnp.arange(k.shape[1])  # Shape: [L]
    mask = jnp.arange(self.decode_length)[None, :] <= queries[:, None]  # Shape: [L, M]
    return keys.value, values.value, mask[None, None]

  def _ring_cached(self, k: jax.Array, v: jax.Array, start: jax.Array | int):
    """Sliding-window decoding: (the R ring slots' keys and values, then k, v [B, L, KV, A]'s
    own, [B, R + L, KV, A]; the mask [1, 1, L, R + L] of those within each query's window),
    then k, v's last R written into their slots (position p in slot p % R). R =
    min(window, decode_length) slots hold every key a window can see."""
    length, slots = k.shape[1], min(self.window, self.decode_length)
    shape = (k.shape[0], slots, *k.shape[2:])
    keys = self.variable('cache', 'cached_key', jnp.zeros, shape, k.dtype)
    values = self.variable('cache', 'cached_value', jnp.zeros, shape, v.dtype)
    # Each slot's last position before start (negative: not written yet). With R = 4 at start 6:
    # slots 0, 1, 2, 3 hold positions 4, 5, 2, 3.
    held = start - 1 - (start - 1 - jnp.arange(slots)) % slots  # Shape: [R]
    positions = start + jnp.arange(length)  # Shape: [L]
    offsets = positions[:, None] - jnp.concatenate([held, positions])[None, :]  # [L, R + L]
    mask = (offsets >= 0) & (offsets < self.window) & (jnp.concatenate([held, positions]) >= 0)
    all_keys = jnp.concatenate([keys.value, k], axis=1)  # Shape: [B, R + L, KV, A]
    all_values = jnp.concatenate([values.value, v], axis=1)
    written = positions[-slots:] % slots  # the slots of the last R positions
    keys.value = keys.value.at[:, written].set(k[:, -slots:])
    values.value = values.value.at[:, written].set(v[:, -slots:])
    return all_keys, all_values, mask[None, None]


def softmax_with_sinks(logits: jax.Array, sinks: jax.Array) -> jax.Array:
  """Softmax of logits [B, H, L, M] over M with one more logit per head, sinks [H], in each
  denominator (its probability dropped: the rows sum to less than one)."""
  sink = jnp.broadcast_to(sinks[None, :, None, None], (*logits.shape[:3], 1))  # [B, H, L, 1]
  return jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]


class Mlp(nn.Module):
  """Dense FFN [B, L, D] -> [B, L, D] of width `ffn_dim` (F) (no biases, like the experts)."""
  config: ModelConfig
  ffn_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype,
                                            param_dtype=cfg.storage_dtype, name=name)
    hidden = ACTIVATIONS[cfg.activation](dense(self.ffn_dim, 'wi')(x))  # Shape: [B, L, F]
    if cfg.glu:
      hidden = hidden * dense(self.ffn_dim, 'wi_gate')(x)
    return dense(cfg.model_dim, 'wo')(hidden)


def causal_mask(mask: jax.Array, window: int | None = None) -> jax.Array:
  """Self-attention mask [B, 1, L, L] from the padding mask [B, L]: real keys not in the future
  (and, with a `window`, fewer than `window` positions back)."""
  offsets = jnp.arange(mask.shape[1])[:, None] - jnp.arange(mask.shape[1])[None, :]  # [L, L]
  allowed = (offsets >= 0) & (offsets < (window or mask.shape[1]))
  return mask[:, None, None, :] & allowed


def full_mask(query_mask: jax.Array, key_mask: jax.Array) -> jax.Array:
  """[B, 1, L, M]: every real query attends to every real key."""
  return query_mask[:, None, :, None] & key_mask[:, None, None, :]


class Block(nn.Module):
  """Pre-norm block: x + SelfAttention(norm x) [+ CrossAttention] + Ffn(norm x).

  `sparse` puts a MoeLayer (or, in the dense baseline, an FFN of width (K + shared) * F) in the
  FFN slot; its routing is causal when the stack is (decoders), and it gets the padding mask.
  `decode_length`: a causal stack decoding with a cache (`Stack`); `window`: the self-attention's
  sliding window (`ModelConfig.attention_window`).
  """
  config: ModelConfig
  sparse: bool
  causal: bool
  cross_attention: bool
  deterministic: bool
  decode_length: int | None = None
  window: int | None = None

  @nn.compact
  def __call__(self, x, padding_mask, self_bias, encoded=None, encoded_mask=None, token_ids=None,
               start=0):
    """x [B, L, D], padding_mask [B, L]; encoded [B, M, D], encoded_mask [B, M] when cross;
    token_ids [B, L]: the stack's input ids (hash routing reads them); start: x[:, 0]'s position
    (decoding)."""
    cfg = self.config
    norm = lambda name: rms_norm(cfg, name)
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    use_rotary = cfg.position_kind == 'rotary'
    mask = None  # decoding: the attention's cache masks the keys
    if self.decode_length is None:
      mask = (causal_mask(padding_mask, self.window) if self.causal
              else full_mask(padding_mask, padding_mask))  # Shape: [B, 1, L, L]
    h = norm('pre_attention_norm')(x)
    attention = LatentAttention if cfg.attention == 'mla' else Attention
    x = x + drop(attention(cfg, use_rotary, self.decode_length, self.window, name='attention')(
        h, h, mask, self_bias, start))
    if self.cross_attention:
      h = norm('pre_cross_attention_norm')(x)
      x = x + drop(Attention(cfg, name='cross_attention')(
          h, encoded, full_mask(padding_mask, encoded_mask), None))
    h = norm('pre_ffn_norm')(x)
    if self.sparse and not cfg.dense_baseline:
      y = cfg.moe_layer(self.causal, 'moe', self.decode_length)(
          h, self.deterministic, padding_mask=padding_mask, token_ids=token_ids)
    else:
      width = cfg.dense_baseline_width if self.sparse else cfg.dense_width
      y = Mlp(cfg, width, name='mlp')(h)
    return x + drop(y)


class Unit(nn.Module):
  """One period of the stack's MoE layout (what scan repeats): `config.stack_period` blocks,
  the first of them the stack's block `first`."""
  config: ModelConfig
  causal: bool
  cross_attention: bool
  deterministic: bool
  decode_length: int | None = None
  first: int = 0

  @nn.compact
  def __call__(self, x, padding_mask, self_bias, encoded, encoded_mask, token_ids, start):
    cfg, cross = self.config, self.cross_attention
    for i in range(cfg.stack_period(cross)):
      x = Block(cfg, cfg.is_sparse(self.first + i, cross), self.causal, cross,
                self.deterministic, self.decode_length, cfg.attention_window(self.first + i),
                name=f'block_{i}')(
                    x, padding_mask, self_bias, encoded, encoded_mask, token_ids, start)
    return x


class _ScannedUnit(Unit):
  """Unit with nn.scan's (carry, inputs) -> (carry, outputs) signature."""

  def __call__(self, x, padding_mask, self_bias, encoded, encoded_mask, token_ids, start):
    return super().__call__(x, padding_mask, self_bias, encoded, encoded_mask, token_ids,
                            start), None


class Stack(nn.Module):
  """The stack's blocks (`config.stack_layers`, in units of `config.stack_period`), then a final
  norm. Plain loop or nn.scan.

  `decode_length` (a causal stack sampling with a cache): each call takes the next L tokens of
  sequences of decode_length, from the position in the 'cache' collection ('index').
  """
  config: ModelConfig
  causal: bool
  cross_attention: bool = False
  decode_length: int | None = None

  @nn.compact
  def __call__(self, x, padding_mask, deterministic: bool, encoded=None, encoded_mask=None,
               token_ids=None):
    cfg = self.config
    start, key_length = 0, x.shape[1]
    if self.decode_length is not None:
      index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
      start, key_length = index.value, self.decode_length
      index.value = start + x.shape[1]
    bias = None
    if cfg.position_kind == 'relative':
      bias = RelativePositionBias(cfg, bidirectional=not self.causal, name='relative_bias')(
          x.shape[1], key_length, start)  # Shape: [1, H, L, M]
    period = cfg.stack_period(self.cross_attention)
    num_layers = cfg.stack_layers(self.cross_attention)
    num_units = num_layers // period
    args = (padding_mask, bias, encoded, encoded_mask, token_ids, start)
    unit_args = (cfg, self.causal, self.cross_attention, deterministic, self.decode_length)
    if cfg.scan_layers:
      unit = _ScannedUnit
      if cfg.remat:
        unit = nn.remat(unit, prevent_cse=False)
      scanned = nn.scan(unit, variable_axes={'params': 0, 'intermediates': 0, DECISIONS: 0,
                                             BIAS_COLLECTION: 0, 'cache': 0},
                        split_rngs={'params': True, 'dropout': True, 'jitter': True,
                                    'gating': True},
                        in_axes=(nn.broadcast,) * len(args), length=num_units)
      x, _ = scanned(*unit_args, name='units')(x, *args)
    else:
      unit = nn.remat(Unit) if cfg.remat else Unit
      for i in range(num_units):
        x = unit(*unit_args, first=i * period, name=f'unit_{i}')(x, *args)
      # Blocks past the last full unit (num_layers not a multiple of period) are dense.
      for i in range(num_units * period, num_layers):
        x = Block(cfg, False, self.causal, self.cross_attention, deterministic,
                  self.decode_length, cfg.attention_window(i), name=f'block_{i}')(x, *args)
    return rms_norm(cfg, 'final_norm')(x)


def output_logits(config: ModelConfig, embed: nn.Embed, x: jax.Array) -> jax.Array:
  """x [B, L, D] -> logits [B, L, V] in float32: a Dense layer 'logits', or with
  `tie_embeddings` the embedding's transpose applied to x * D^-0.5 (T5's tied output)."""
  x = x.astype(jnp.float32)
  if config.tie_embeddings:
    return (x * config.model_dim ** -0.5) @ embed.embedding.astype(jnp.float32).T
  return nn.Dense(config.vocab_size, use_bias=False, dtype=jnp.float32,
                  param_dtype=config.storage_dtype, name='logits')(x)


class DecoderLM(nn.Module):
  """Decoder-only language model: tokens [B, L] -> logits [B, L, V] (float32).

  Causal self-attention with rotary positions (or T5 relative bias), causal MoE routing.
  `decode_length`: sample with a cache (`moejax.train.sampling`): each call takes the next
  tokens of sequences of that length (see `Stack`).
  """
  config: ModelConfig
  decode_length: int | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, padding_mask: jax.Array,
               deterministic: bool) -> jax.Array:
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.model_dim, embedding_init=nn.initializers.normal(1.0),
                     dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name='embed')
    x = Stack(cfg, causal=True, decode_length=self.decode_length, name='decoder')(
        embed(inputs), padding_mask, deterministic, token_ids=inputs)  # Shape: [B, L, D]
    return output_logits(cfg, embed, x)  # Shape: [B, L, V]


class EncoderDecoder(nn.Module):
  """T5-style encoder-decoder: (inputs [B, M], decoder inputs [B, L]) -> logits [B, L, V].

  The encoder is bidirectional and routes its MoE layers non-causally (GShard order); the decoder
  is causal, cross-attends to the encoder and routes causally. Embeddings are shared.
  `decode_length`: the decoder samples with a cache (see `DecoderLM`); the encoder reads all of
  its inputs at every call.
  """
  config: ModelConfig
  decode_length: int | None = None

  @nn.compact
  def __call__(self, inputs, inputs_mask, decoder_inputs, decoder_mask,
               deterministic: bool) -> jax.Array:
    cfg = self.config
    embed = nn.Embed(cfg.vocab_size, cfg.model_dim, embedding_init=nn.initializers.normal(1.0),
                     dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name='embed')
    encoded = Stack(cfg, causal=False, name='encoder')(
        embed(inputs), inputs_mask, deterministic, token_ids=inputs)  # Shape: [B, M, D]
    x = Stack(cfg, causal=True, cross_attention=True, decode_length=self.decode_length,
              name='decoder')(
        embed(decoder_inputs), decoder_mask, deterministic, encoded, inputs_mask,
        token_ids=decoder_inputs)  # Shape: [B, L, D]
    return output_logits(cfg, embed, x)  # Shape: [B, L, V]


def make_model(config: ModelConfig, decode_length: int | None = None) -> nn.Module:
  """The model of `config`; with `decode_length`, the one that samples with a cache."""
  model = DecoderLM if config.kind == 'decoder' else EncoderDecoder
  return model(config, decode_length)
