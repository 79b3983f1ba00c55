"""Attention options of the model (gpt-oss's sinks and alternating sliding windows, Qwen3's
per-head QK-norm and output bias): hand-checked masks and softmax, the window bounding the
decode cache, and cached decoding equal to recomputing the whole window."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import ConfigError
from moejax.models import ModelConfig, make_model
from moejax.models.transformer import causal_mask, softmax_with_sinks

L = 12
SMALL = dict(vocab_size=50, num_layers=2, model_dim=32, num_heads=4, ffn_dim=32, num_experts=4,
             num_selected_experts=2, moe_every=1)
# Block 0 slides over 3 positions, block 1 sees all; a prompt of 5 overflows the ring of 3.
EVERY_OPTION = dict(SMALL, num_kv_heads=2, sliding_window=3, full_attention_layers=(1,),
                    attention_sinks=True, attention_bias=True, attention_out_bias=True,
                    qk_head_norm=True)


def test_a_window_of_two_keeps_each_query_and_the_key_before():
  expected = np.array([[1, 0, 0, 0],
                       [1, 1, 0, 0],
                       [0, 1, 1, 0],
                       [0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(causal_mask(jnp.ones((1, 4), bool), 2)[0, 0], expected)
  np.testing.assert_array_equal(causal_mask(jnp.ones((1, 4), bool))[0, 0], np.tril(np.ones(4)))


def test_a_sink_takes_its_share_of_the_denominator_and_gives_nothing():
  # Three keys of logit 0 and a sink of logit log 2: e^0 / (3 + 2) = 0.2 each, 0.4 to the sink.
  probs = softmax_with_sinks(jnp.zeros((1, 1, 1, 3)), jnp.log(jnp.array([2.0])))
  np.testing.assert_allclose(probs, np.full((1, 1, 1, 3), 0.2), rtol=1e-6)


def _params_and_logits(config, ids):
  model, mask = make_model(config), jnp.ones(ids.shape, jnp.bool_)
  params = jax.jit(lambda: model.init(jax.random.key(0), ids, mask, True)['params'])()
  return params, jax.jit(lambda p: model.apply({'params': p}, ids, mask, True))(params)


def _decode(config, params, ids, pieces):
  """The logits of decoding `ids` in `pieces` with a cache, and the cache."""
  decoding, mask = make_model(config, decode_length=ids.shape[1]), jnp.ones(ids.shape, jnp.bool_)
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
      lambda: decoding.init(jax.random.key(0), ids[:, :1], mask[:, :1], True)['cache']))
  step = jax.jit(lambda cache, *inputs: decoding.apply(
      {'params': params, 'cache': cache}, *inputs, True, mutable=['cache']))
  logits = []
  for begin, end in pieces:
    out, state = step(cache, ids[:, begin:end], mask[:, begin:end])
    logits.append(out)
    cache = state['cache']
  return jnp.concatenate(logits, axis=1), cache


@pytest.mark.slow
def test_cached_decoding_with_every_option_gives_the_whole_windows_logits():
  config = ModelConfig(**EVERY_OPTION)
  ids = jax.random.randint(jax.random.key(1), (2, L), 3, 50)
  params, _ = _params_and_logits(config, ids)
  attention = params['decoder']['unit_0']['block_0']['attention']
  assert attention['sinks'].shape == (4,) and attention['out']['bias'].shape == (32,)
  assert attention['query_norm']['scale'].shape == (8,)  # one scale per head feature
  # Sinks, biases and norm scales away from their initial 0 and 1.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
  expected = jax.jit(lambda p: make_model(config).apply(
      {'params': p}, ids, jnp.ones(ids.shape, bool), True))(params)
  logits, cache = _decode(config, params, ids, [(0, 5)] + [(t, t + 1) for t in range(5, L)])
  np.testing.assert_allclose(logits, expected, atol=1e-5)
  # The sliding block's cache is its window, the full block's the whole sequence.
  blocks = cache['decoder']['unit_0'], cache['decoder']['unit_1']
  assert blocks[0]['block_0']['attention']['cached_key'].shape == (2, 3, 2, 8)
  assert blocks[1]['block_0']['attention']['cached_key'].shape == (2, L, 2, 8)


@pytest.mark.slow
def test_the_window_changes_the_logits_only_past_its_length():
  ids = jax.random.randint(jax.random.key(1), (2, L), 3, 50)
  params, full = _params_and_logits(ModelConfig(**SMALL), ids)
  window = make_model(ModelConfig(**SMALL, sliding_window=4))
  windowed = jax.jit(lambda p: window.apply({'params': p}, ids, jnp.ones(ids.shape, bool),
                                            True))(params)
  np.testing.assert_allclose(windowed[:, :4], full[:, :4], atol=1e-6)
  assert np.abs(windowed[:, 4:] - full[:, 4:]).min(axis=-1).max() > 1e-4


@pytest.mark.slow
def test_a_scanned_stack_of_sliding_blocks_decodes_as_its_whole_window():
  config = ModelConfig(**SMALL, sliding_window=5, scan_layers=True)
  ids = jax.random.randint(jax.random.key(1), (2, L), 3, 50)
  params, expected = _params_and_logits(config, ids)
  logits, _ = _decode(config, params, ids, [(0, 7)] + [(t, t + 1) for t in range(7, L)])
  np.testing.assert_allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize('fields, field', [
    (dict(sliding_window=0), 'sliding_window'),
    (dict(sliding_window=4, kind='encoder_decoder'), 'sliding_window'),
    (dict(full_attention_layers=(1,)), 'full_attention_layers'),
    (dict(sliding_window=4, full_attention_layers=(2,)), 'full_attention_layers'),
    (dict(sliding_window=4, full_attention_layers=(1,), scan_layers=True),
     'full_attention_layers'),
    (dict(qk_norm=True, qk_head_norm=True), 'qk_head_norm')])
def test_a_bad_attention_option_is_refused_naming_its_field(fields, field):
  with pytest.raises(ConfigError, match=f'^model.{field}='):
    ModelConfig(**{**SMALL, **fields})
