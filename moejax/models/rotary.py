"""Rotary position embeddings (RoPE, arXiv:2104.09864) with the options today's checkpoints use:
partial rotary (only the first `rotary_fraction` of each head's dims turn: GLM-4.5) and YaRN
context extension (arXiv:2309.00071: DeepSeek-V2/V3, gpt-oss), computed as transformers 4.57.6's
`modeling_rope_utils` does (`_compute_default_rope_parameters`, `_compute_yarn_parameters`).

Layout: of a head's A dims the first R = int(A * rotary_fraction) turn, dim i with dim i + R/2
(Hugging Face's rotate_half), at the frequencies `inverse_frequencies`; the other A - R pass
unchanged. A checkpoint that pairs adjacent dims instead (DeepSeek's interleaved layout) is the
same model with its q and k weights' rotary dims permuted (`moejax.convert.deepseek`).

YaRN (`yarn_factor` set) mixes each frequency's interpolated (divided by the factor) and original
value by a ramp over the dims between the correction range's ends (`yarn_beta_fast`,
`yarn_beta_slow` rotations over `yarn_original_length` positions), and scales cos and sin by the
attention factor (`yarn_attention_factor`, else from `yarn_mscale` / `yarn_mscale_all_dim`), so
the rotated part of every q.k is scaled by its square.

The frequencies are NumPy float32 constants of the (static) config, computed in the reference's
order of operations: they equal transformers' but for a few elements in some settings, where
torch's float32 pow is an ulp off the correctly rounded power (checked on the DeepSeek-V2/V3,
gpt-oss and GLM-4.5 settings).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rotary_dims(config, head_dim: int) -> int:
  """R: the dims of a head of width `head_dim` that turn (the first R)."""
  return int(head_dim * config.rotary_fraction)


def attention_factor(config) -> float:
  """The factor cos and sin are scaled by: 1 without YaRN; YaRN's `yarn_attention_factor`, else
  mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set (DeepSeek), else
  mscale(factor)."""
  factor = config.yarn_factor
  if factor is None:
    return 1.0
  if config.yarn_attention_factor is not None:
    return config.yarn_attention_factor
  if config.yarn_mscale and config.yarn_mscale_all_dim:
    return float(yarn_mscale(factor, config.yarn_mscale) /
                 yarn_mscale(factor, config.yarn_mscale_all_dim))
  return yarn_mscale(factor)


def _correction_range(config, dim: int) -> tuple[float, float]:
  """The dims (in pairs) between which YaRN ramps from interpolated to original frequencies:
  where a frequency turns beta_fast and beta_slow times over the original length (floored and
  ceiled unless `yarn_truncate` is False), clipped to [0, dim - 1]."""
  def dim_of(rotations):
    return (dim * math.log(config.yarn_original_length / (rotations * 2 * math.pi))
            / (2 * math.log(config.rope_theta)))
  low, high = dim_of(config.yarn_beta_fast), dim_of(config.yarn_beta_slow)
  if config.yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  return max(low, 0), min(high, dim - 1)


def inverse_frequencies(config, head_dim: int) -> np.ndarray:
  """[R/2] float32: theta^(-2i / R) for i < R/2, with YaRN's interpolation when it is set."""
  dim = rotary_dims(config, head_dim)
  exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)  # Shape: [R/2]
  # theta ** exponents rounded from float64: torch's float32 pow but for rare ulps (NumPy's
  # float32 pow is further off).
  base = (np.float64(config.rope_theta) ** exponents.astype(np.float64)).astype(np.float32)
  original = np.float32(1.0) / base
  if config.yarn_factor is None:
    return original
  interpolated = np.float32(1.0) / (np.float32(config.yarn_factor) * base)
  low, high = _correction_range(config, dim)
  if low == high:
    high += 0.001  # the reference's guard against a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                 / np.float32(high - low), 0, 1)  # 0 below low, 1 above high; Shape: [R/2]
  original_share = np.float32(1.0) - ramp
  return (interpolated * (np.float32(1.0) - original_share)
          + original * original_share).astype(np.float32)


def rotary(x: jax.Array, config, start: jax.Array | int = 0) -> jax.Array:
  """x [B, L, H, A] with its first R dims of each head rotated, x[:, i] at position start + i
  (`config`: rope_theta, rotary_fraction and the yarn_* fields of a ModelConfig)."""
  inv_freq = jnp.asarray(inverse_frequencies(config, x.shape[-1]))  # Shape: [R/2]
  half = inv_freq.shape[0]
  positions = start + jnp.arange(x.shape[1], dtype=jnp.float32)  # Shape: [L]
  angles = positions[:, None] * inv_freq  # Shape: [L, R/2]
  scale = attention_factor(config)
  cos = (jnp.cos(angles) * scale)[:, None, :]  # Shape: [L, 1, R/2]
  sin = (jnp.sin(angles) * scale)[:, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2, rest = x32[..., :half], x32[..., half:2 * half], x32[..., 2 * half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1).astype(x.dtype)
