"""flaxformer's scatter MoeLayer (google/flaxformer, Apache-2.0) at `benchmarks/layer.py`'s shapes,
timed beside moejax's layer there (`python benchmarks/layer.py --flaxformer PATH`). Benchmark only:
moejax never imports flaxformer.

PATH is a checkout of github.com/google/flaxformer (the directory holding `flaxformer/`). Its
`components/dense.py` imports AQT quantization, which the unquantized MlpBlock never uses; empty
stand-ins for those modules are put in `sys.modules` when `aqt` is not installed.

The layer is flaxformer's own Switch setup: `TokensChooseScatterRouter` (float32 router, no
jitter, no batch-prioritized routing), scatter dispatch into [G, E, C, D] buffers, the experts
a vmapped ReLU `MlpBlock` without biases, run with `enable_dropout=False` (evaluation mode: no
dropout, the eval capacity factor, set equal to the training one); the loss adds its sown
load-balancing loss, as `layer.moe_step` adds moejax's.
"""
import sys
import types

import jax
import jax.numpy as jnp


def _stub_aqt():
  """Empty `aqt.jax_legacy.jax` modules: only names that dense.py's annotations read."""
  quantization = types.ModuleType('aqt.jax_legacy.jax.quantization')
  quantization.QuantOps = type('QuantOps', (), {'WeightParams': object, 'ActHParams': object})
  names = ('aqt', 'aqt.jax_legacy', 'aqt.jax_legacy.jax', 'aqt.jax_legacy.jax.flax_layers',
           'aqt.jax_legacy.jax.quant_config')
  sys.modules.update({name: types.ModuleType(name) for name in names})
  sys.modules['aqt.jax_legacy.jax.quantization'] = quantization
  sys.modules['aqt.jax_legacy.jax'].quantization = quantization


def flaxformer_step(path: str, x: jax.Array, num_experts: int, k: int, ffn_dim: int,
                    group_size: int, capacity_factor: float):
  """(jitted fwd+bwd of flaxformer's MoeLayer on x [B, L, D], its args, expert-weight bytes)."""
  if path not in sys.path:
    sys.path.insert(0, path)
  try:
    import aqt  # noqa: F401
  except ImportError:
    _stub_aqt()
  from flaxformer.architectures.moe import moe_layers, routing
  from flaxformer.components import dense

  router = routing.TokensChooseScatterRouter(
      router_weights=routing.RouterWeights(use_bias=False, dtype=jnp.float32),
      num_selected_experts=k, jitter_noise=0.0, batch_prioritized_routing=False,
      ignore_padding_tokens=False, dtype=jnp.float32)
  expert = dense.MlpBlock(use_bias=False, intermediate_dim=ffn_dim, activations=('relu',),
                          intermediate_dropout_rate=0.0, final_dropout_rate=0.0,
                          dtype=jnp.float32)
  layer = moe_layers.MoeLayer(
      num_experts=num_experts, max_group_size=group_size, train_capacity_factor=capacity_factor,
      eval_capacity_factor=capacity_factor, expert=expert, router=router,
      num_expert_partitions=num_experts, num_model_partitions=1, dropout_rate=0.0,
      dtype=jnp.float32)
  params = layer.init(jax.random.key(1), x, enable_dropout=False)['params']

  def loss(params, x):
    out, state = layer.apply({'params': params}, x, enable_dropout=False,
                             mutable=['intermediates'])
    return jnp.sum(out) + jnp.sum(state['intermediates']['auxiliary_loss'][0])
  weight_bytes = sum(w.nbytes for w in jax.tree.leaves(params['expert']))
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x), weight_bytes
