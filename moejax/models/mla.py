"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv:2405.04434), `ModelConfig.attention='mla'`.

Axis legend (DESIGN.md, transformer.py): B, L, M, D, H as there; Q the query latent
(`q_lora_rank`), R the key/value latent (`kv_lora_rank`), N the unrotated and P the rotated part
of each head's query and key (`qk_nope_head_dim`, `qk_rope_head_dim`), U each head's value width
(`v_head_dim`).

Keys and values come from one latent per token, c = RMSNorm(x W_kv_down) [R], shared by all heads,
and one rotated key part k_rope [P] per token, also shared: head h's key is
[c W_kv_up[h, :N], k_rope] and its value c W_kv_up[h, N:]. The query is x W_query (or, with
`q_lora_rank`, RMSNorm(x W_query_down) W_query_up), [N + P] per head, its last P dims rotated.
The softmax scale is (N + P)^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 when
`mla_softmax_mscale` (DeepSeek's code and transformers' V3; transformers 4.57.6's V2 leaves it out).

A decoding cache holds what a token contributes, R + P numbers, not the 2 * H * (N + U) of its
keys and values: 'cached_latent' [B, M, R] and 'cached_key_rope' [B, M, P]. Each step makes the
keys and values of the whole window from them (the up-projection is not absorbed into the query).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.models.config import ModelConfig
from moejax.models.rotary import rotary, yarn_mscale

# The latents' RMSNorms keep this epsilon whatever `norm_eps` is (DeepSeek's code and
# transformers 4.57.6 build them with the class default).
LATENT_NORM_EPS = 1e-6


def softmax_scale(config: ModelConfig) -> float:
  """(N + P)^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 with `mla_softmax_mscale`."""
  scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
  if config.mla_softmax_mscale and config.yarn_factor and config.yarn_mscale_all_dim:
    scale *= yarn_mscale(config.yarn_factor, config.yarn_mscale_all_dim) ** 2
  return scale


class LatentAttention(nn.Module):
  """MLA self-attention [B, L, D] -> [B, L, D] with `Attention`'s fields and call (rotary
  positions always, whatever `use_rotary`; no `window`). With `decode_length`, causal attention
  over the cached latents (see the module's docstring); `mask` is then not used."""
  config: ModelConfig
  use_rotary: bool = True
  decode_length: int | None = None
  window: None = None  # no sliding window: the model config refuses one with MLA

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array, mask: jax.Array | None,
               bias: jax.Array | None, start: jax.Array | int = 0) -> jax.Array:
    """x [B, L, D] (queries), kv [B, M, D] (keys and values: x itself), mask [B, 1, L, M];
    bias [1, H, L, M] or None; start: the position of x[:, 0] (decoding)."""
    cfg = self.config
    h, n, p, u = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q = self._query(x)  # Shape: [B, L, H, N + P]
    q = jnp.concatenate([q[..., :n], rotary(q[..., n:], cfg, start)], -1)
    down = self._dense(cfg.kv_lora_rank + p, 'kv_down')(kv)  # Shape: [B, M, R + P]
    latent = self._norm('kv_norm')(down[..., :cfg.kv_lora_rank])  # Shape: [B, M, R]
    key_rope = rotary(down[..., None, cfg.kv_lora_rank:], cfg, start)[:, :, 0]  # [B, M, P]
    if self.decode_length is not None:
      latent, key_rope, mask = self._cached(latent, key_rope, start)  # [B, M, R], [B, M, P]
    up = nn.DenseGeneral((h, n + u), use_bias=False, dtype=cfg.compute_dtype,
                         param_dtype=cfg.storage_dtype, name='kv_up')(latent)  # [B, M, H, N + U]
    k = jnp.concatenate([up[..., :n], jnp.broadcast_to(key_rope[:, :, None], (
        *key_rope.shape[:2], h, p))], -1)  # Shape: [B, M, H, N + P]
    logits = jnp.einsum('blhd,bmhd->bhlm', q, k).astype(jnp.float32) * softmax_scale(cfg)
    if bias is not None:
      logits = logits + bias
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)  # Shape: [B, H, L, M]
    probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
    out = jnp.einsum('bhlm,bmhu->blhu', probs, up[..., n:])  # Shape: [B, L, H, U]
    return nn.DenseGeneral(cfg.model_dim, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
                           param_dtype=cfg.storage_dtype, name='out')(out)  # Shape: [B, L, D]

  def _query(self, x: jax.Array) -> jax.Array:
    """x [B, L, D] -> q [B, L, H, N + P], through the query latent [B, L, Q] when q_lora_rank."""
    cfg = self.config
    heads = (cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    if cfg.q_lora_rank is None:
      return self._dense(heads, 'query')(x)
    latent = self._norm('query_norm')(self._dense(cfg.q_lora_rank, 'query_down')(x))  # [B, L, Q]
    return self._dense(heads, 'query_up')(latent)

  def _dense(self, features, name: str) -> nn.DenseGeneral:
    cfg = self.config
    return nn.DenseGeneral(features, use_bias=False, dtype=cfg.compute_dtype,
                           param_dtype=cfg.storage_dtype, name=name)

  def _norm(self, name: str) -> nn.RMSNorm:
    cfg = self.config
    return nn.RMSNorm(epsilon=LATENT_NORM_EPS, dtype=cfg.compute_dtype,
                      param_dtype=cfg.storage_dtype, name=name)

  def _cached(self, latent: jax.Array, key_rope: jax.Array, start: jax.Array | int):
    """Write latent [B, L, R] and key_rope [B, L, P] at `start` into the cache; (every cached
    latent [B, M, R] and rotated key [B, M, P], M = decode_length, and the mask [1, 1, L, M] of
    the keys at or before each query)."""
    batch, length = latent.shape[:2]
    latents = self.variable('cache', 'cached_latent', jnp.zeros,
                            (batch, self.decode_length, latent.shape[-1]), latent.dtype)
    keys = self.variable('cache', 'cached_key_rope', jnp.zeros,
                         (batch, self.decode_length, key_rope.shape[-1]), key_rope.dtype)
    latents.value = jax.lax.dynamic_update_slice(latents.value, latent, (0, start, 0))
    keys.value = jax.lax.dynamic_update_slice(keys.value, key_rope, (0, start, 0))
    queries = start + jnp.arange(length)  # Shape: [L]
    mask = jnp.arange(self.decode_length)[None, :] <= queries[:, None]  # Shape: [L, M]
    return latents.value, keys.value, mask[None, None]
