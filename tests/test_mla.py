"""Multi-head latent attention: its softmax scale worked by hand, its cache (the latent and the
rotated key, nothing per head), cached decoding against the whole window, and its config checks.
Parity with DeepSeek's checkpoints: tests/test_deepseek.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_decoding_matches_the_window
from moejax.errors import ConfigError
from moejax.models import ModelConfig, make_model, per_token_flops
from moejax.models.mla import softmax_scale

MLA = dict(vocab_size=40, num_layers=2, model_dim=32, num_heads=4, ffn_dim=32, num_experts=4,
           moe_every=2, attention='mla', kv_lora_rank=12, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=6)
YARN = dict(rope_theta=1e4, yarn_factor=40.0, yarn_original_length=64, yarn_mscale=1.0,
            yarn_mscale_all_dim=1.0)


def test_softmax_scale_takes_yarns_mscale_squared():
  """(8 + 4)^-0.5 = .2887; with YaRN x40 and mscale_all_dim 1: (0.1 ln 40 + 1)^2 = 1.8739 times."""
  assert softmax_scale(ModelConfig(**MLA)) == pytest.approx(12 ** -0.5)
  config = ModelConfig(**MLA, **YARN)
  assert softmax_scale(config) == pytest.approx(12 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
  without = ModelConfig(**MLA, **YARN, mla_softmax_mscale=False)  # transformers' DeepSeek-V2
  assert softmax_scale(without) == pytest.approx(12 ** -0.5)


def test_the_cache_holds_the_latent_and_the_rotated_key_only():
  config = ModelConfig(**MLA, q_lora_rank=10)
  ids = jnp.ones((2, 1), jnp.int32)
  cache = jax.eval_shape(lambda: make_model(config, decode_length=16).init(
      jax.random.key(0), ids, ids > 0, True)['cache'])
  attention = cache['decoder']['unit_0']['block_0']['attention']
  assert {k: v.shape for k, v in attention.items()} == {'cached_latent': (2, 16, 12),
                                                        'cached_key_rope': (2, 16, 4)}


@pytest.mark.parametrize('fields', [pytest.param(dict(), marks=pytest.mark.slow),
                                    dict(q_lora_rank=10, **YARN)],
                         ids=['V2-Lite-like', 'V3-like'])
def test_decoding_from_the_latent_cache_equals_the_whole_window(fields):
  """Dense FFNs: the cache under test is the attention's (MoE decoding: test_sampling)."""
  assert_decoding_matches_the_window(ModelConfig(**{**MLA, 'moe_every': 0}, **fields))


@pytest.mark.parametrize('fields, message', [
    (dict(attention='mqa'), 'model.attention'),
    (dict(kind='encoder_decoder'), 'model.kind'),
    (dict(num_kv_heads=2), 'model.num_kv_heads'),
    (dict(qk_norm=True), 'model.qk_norm'),
    (dict(rotary_fraction=0.5), 'model.rotary_fraction'),
    (dict(q_lora_rank=0), 'model.q_lora_rank'),
    (dict(qk_rope_head_dim=3), 'model.rotary_fraction'),  # an odd rotary width
    (dict(sliding_window=4), 'model.sliding_window'),
    (dict(attention_sinks=True), 'model.attention_sinks'),
])
def test_bad_latent_attention_fields_are_named(fields, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig(**{**MLA, **fields})


@pytest.mark.slow
def test_flops_by_formula_match_the_compiled_model():
  """per_token_flops counts MLA's matmuls: within 10% of XLA's count of the compiled forward
  pass (which adds the norms, rotary and softmax), dense FFNs so nothing else is routed."""
  config = ModelConfig(**{**MLA, 'moe_every': 0}, q_lora_rank=10)
  ids = jnp.ones((4, 32), jnp.int32)
  model = make_model(config)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids > 0, True))['params']
  cost = jax.jit(lambda p: model.apply({'params': p}, ids, ids > 0, True)).lower(
      params).compile().cost_analysis()
  compiled = (cost[0] if isinstance(cost, list) else cost)['flops'] / ids.size
  np.testing.assert_allclose(per_token_flops(config, 32), compiled, rtol=0.1)
