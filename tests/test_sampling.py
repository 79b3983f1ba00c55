"""Sampling with a KV cache: each decoded position gives the logits of recomputing the whole window
(with tokens dropped over capacity), and the cached sampler gives the uncached one's tokens while
the context fits in the window."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import MoeLayer, collect_decisions
from moejax.models import ModelConfig, make_model
from moejax.train.sampling import generate

L = 16
# A capacity factor of 0.5 drops about a third of the choices: the cache must reproduce which.
SMALL = dict(vocab_size=50, num_layers=2, model_dim=32, num_heads=4, ffn_dim=32, num_experts=4,
             num_selected_experts=2, eval_capacity_factor=0.5, min_expert_capacity=1,
             moe_every=1)
VARIANTS = {
    'decoder': dict(kind='decoder'),
    'decoder, GQA, QK-norm, scanned': dict(kind='decoder', num_kv_heads=2, qk_norm=True,
                                           rope_theta=1e6, scan_layers=True),
    'decoder, groups of 8, T5 positions': dict(kind='decoder', group_size=8,
                                               positions='relative'),
    'encoder-decoder': dict(kind='encoder_decoder'),
}
SLOW = {'decoder, GQA, QK-norm, scanned', 'decoder, groups of 8, T5 positions',
        'encoder-decoder'}  # make test-fast keeps the plain decoder


def _model_inputs(config, ids):
  mask = jnp.ones(ids.shape, jnp.bool_)
  encoder = (ids[:, ::-1], mask) if config.kind == 'encoder_decoder' else ()
  return encoder, mask


@pytest.mark.parametrize('variant', [pytest.param(v, marks=[pytest.mark.slow] if v in SLOW else [])
                                     for v in VARIANTS])
def test_each_decoded_position_gives_the_logits_of_the_whole_window(variant):
  config = ModelConfig(**SMALL, **VARIANTS[variant])
  ids = jax.random.randint(jax.random.key(1), (2, L), 3, 50)
  encoder, mask = _model_inputs(config, ids)
  full, decoding = make_model(config), make_model(config, decode_length=L)
  # Each compiled whole (one program) rather than run op by op, which costs more here.
  params = jax.jit(lambda: full.init(jax.random.key(0), *encoder, ids, mask, True)['params'])()
  expected, state = jax.jit(lambda params: full.apply({'params': params}, *encoder, ids, mask,
                                                      True, mutable=['decisions']))(params)
  dropped = sum(int((d.chosen & ~d.dispatched).sum()) for d in collect_decisions(state).values())
  assert dropped > 10
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(  # an empty cache
      lambda: decoding.init(jax.random.key(0), *encoder, ids[:, :1], mask[:, :1], True)['cache']))
  step = jax.jit(lambda cache, *inputs: decoding.apply(
      {'params': params, 'cache': cache}, *inputs, True, mutable=['cache']))
  pieces = [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, L)]  # a prompt in two, then one by one
  for begin, end in pieces:
    logits, state = step(cache, *encoder, ids[:, begin:end], mask[:, begin:end])
    cache = state['cache']
    np.testing.assert_allclose(logits, expected[:, begin:end], atol=1e-5, err_msg=str(begin))


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['decoder', 'encoder_decoder'])
def test_the_cached_sampler_gives_the_uncached_tokens_while_the_context_fits(kind):
  config = ModelConfig(**SMALL, kind=kind)
  ids = jnp.ones((1, L), jnp.int32)
  encoder, mask = _model_inputs(config, ids)
  model = make_model(config)
  params = jax.jit(lambda: model.init(jax.random.key(0), *encoder, ids, mask, True)['params'])()
  prompt = np.array([5, 6, 7, 8, 9], np.int32)
  fits = L - 1 - (0 if kind == 'encoder_decoder' else len(prompt))  # [PAD, context] <= L
  for temperature in (0.0, 1.0):
    cached = generate(model, params, prompt, fits, L, temperature, 3)
    uncached = generate(model, params, prompt, fits, L, temperature, 3, cache=False)
    np.testing.assert_array_equal(cached, uncached)
  if kind == 'decoder':  # past the window the cache is refilled from the last L / 2 tokens
    assert len(generate(model, params, prompt, 3 * L, L, 1.0, 0)) == 3 * L


def test_a_decoding_layer_refuses_what_cannot_be_decoded():
  with pytest.raises(ValueError, match='decode_length'):
    MoeLayer(num_experts=4, ffn_dim=8, causal=False, decode_length=16)
  with pytest.raises(ValueError, match='decode_length'):
    MoeLayer(num_experts=4, ffn_dim=8, group_size=6, decode_length=16)
