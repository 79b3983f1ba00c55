"""Rotary positions with partial rotary and YaRN: the frequencies and factors against the formulas
of transformers 4.57.6's modeling_rope_utils worked by hand, the rotation itself, and cached
decoding against recomputing the whole window."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_decoding_matches_the_window
from moejax.errors import ConfigError
from moejax.models import ModelConfig
from moejax.models.rotary import attention_factor, inverse_frequencies, rotary

BASE = dict(vocab_size=40, num_layers=2, model_dim=32, num_heads=4, ffn_dim=32, num_experts=4,
            moe_every=1)
# YaRN on a head of 8 dims, theta 1e4, trained to 64 positions, extended 4 times.
YARN = dict(BASE, num_heads=4, head_dim=8, rope_theta=1e4, yarn_factor=4.0,
            yarn_original_length=64)


def test_plain_frequencies_are_theta_to_the_minus_2i_over_the_rotated_dims():
  config = ModelConfig(**BASE, head_dim=8, rope_theta=1e4)
  np.testing.assert_allclose(inverse_frequencies(config, 8), [1, 0.1, 0.01, 0.001], rtol=1e-6)
  half = ModelConfig(**BASE, head_dim=8, rope_theta=1e4, rotary_fraction=0.5)
  np.testing.assert_allclose(inverse_frequencies(half, 8), [1, 0.01], rtol=1e-6)


def test_yarn_ramps_from_original_to_interpolated_frequencies():
  """The correction dims: 8 * ln(64 / (beta * 2 pi)) / (2 ln 1e4) is -0.497 for beta_fast 32
  (floor -1, clipped to 0) and 1.008 for beta_slow 1 (ceil 2): the ramp (i - 0) / 2 over the 4
  pairs is [0, .5, 1, 1], so pair 0 keeps 1, pair 1 mixes .1 and .1 / 4 half and half (.0625),
  pairs 2 and 3 are divided by 4 (.0025, .00025)."""
  config = ModelConfig(**YARN)
  np.testing.assert_allclose(inverse_frequencies(config, 8), [1, 0.0625, 0.0025, 0.00025],
                             rtol=1e-6)
  # Untruncated, the ramp runs from 0 to 1.008: i / 1.008 clipped.
  untruncated = ModelConfig(**YARN, yarn_truncate=False)
  high = 8 * math.log(64 / (2 * math.pi)) / (2 * math.log(1e4))
  share = np.clip(np.arange(4) / high, 0, 1)
  original = np.array([1, 0.1, 0.01, 0.001])
  np.testing.assert_allclose(inverse_frequencies(untruncated, 8),
                             original / 4 * share + original * (1 - share), rtol=1e-6)


@pytest.mark.parametrize('fields, expected', [
    (dict(), 0.1 * math.log(4) + 1),  # mscale(4) = 1.1386
    (dict(yarn_mscale=0.707, yarn_mscale_all_dim=0.707), 1.0),  # DeepSeek-V2's: they cancel
    (dict(yarn_mscale=1.0, yarn_mscale_all_dim=0.5),
     (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1)),
    (dict(yarn_mscale=1.0), 0.1 * math.log(4) + 1),  # mscale_all_dim unset: mscale(4)
    (dict(yarn_attention_factor=0.75), 0.75),
])
def test_yarn_attention_factor(fields, expected):
  assert attention_factor(ModelConfig(**YARN, **fields)) == pytest.approx(expected, rel=1e-12)
  assert attention_factor(ModelConfig(**BASE)) == 1.0


def test_partial_rotary_turns_the_first_dims_in_halves_and_passes_the_rest():
  """At position 3, with fraction 1/2 of 8 dims: dims (0, 2) turn by 3 * 1 rad, (1, 3) by
  3 * .01 rad (YaRN off), dims 4 to 7 are left as they are."""
  config = ModelConfig(**BASE, head_dim=8, rope_theta=1e4, rotary_fraction=0.5)
  x = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  out = np.asarray(rotary(x, config, start=3))[0, 0, 0]
  x = np.asarray(x)[0, 0, 0]
  for i, angle in ((0, 3.0), (1, 0.03)):
    c, s = math.cos(angle), math.sin(angle)
    np.testing.assert_allclose(out[[i, i + 2]], [x[i] * c - x[i + 2] * s, x[i + 2] * c + x[i] * s],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out[4:], x[4:])
  # YaRN's attention factor scales the turned dims only.
  yarn = ModelConfig(**YARN, rotary_fraction=0.5)
  scaled = np.asarray(rotary(jnp.asarray(x)[None, None, None], yarn))[0, 0, 0]
  np.testing.assert_allclose(scaled[:4], x[:4] * attention_factor(yarn), rtol=1e-6)
  np.testing.assert_array_equal(scaled[4:], x[4:])


@pytest.mark.parametrize('fields, message', [
    (dict(rotary_fraction=0.1), 'model.rotary_fraction'),  # int(8 * 0.1) = 0 dims
    (dict(rotary_fraction=0.375), 'model.rotary_fraction'),  # 3 dims: odd
    (dict(yarn_factor=4.0), 'model.yarn_original_length'),
    (dict(yarn_factor=0.5, yarn_original_length=64), 'model.yarn_factor'),
])
def test_bad_rotary_fields_are_named(fields, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig(**BASE, head_dim=8, **fields)


def test_decoding_with_yarn_and_partial_rotary_equals_the_whole_window():
  """Dense FFNs: the cache under test is the attention's (MoE decoding: test_sampling)."""
  assert_decoding_matches_the_window(ModelConfig(
      **{**YARN, 'moe_every': 0}, rotary_fraction=0.5, yarn_mscale=1.0, yarn_mscale_all_dim=0.5))
