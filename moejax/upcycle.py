"""Sparse upcycling (Komatsuzaki et al., 2023): start an MoE model from a trained dense one.

Every expert of a sparse block starts as a copy of the dense FFN in the same block (optionally
perturbed by Gaussian noise), the routers are new (the MoE model's fresh init), and every other
parameter (attention, norms, embeddings, dense FFNs) is copied. Shared experts, if the MoE has
any, keep their fresh init (and add to the output: the equality below needs none). The dense source is the MoE
config's dense twin with one expert's width: `dense_baseline=True, num_selected_experts=1`, whose
block `.../block_i/mlp/{wi,wo}/kernel` [D, F], [F, D] matches `.../block_i/moe/experts/{wi,wo}`
[E, D, F], [E, F, D].

With identical experts a token's output is (sum of its top-K combine weights) x the dense FFN's, so
with `normalize_weights=True` and capacity to spare the upcycled model's first forward pass is the
dense model's (tests/test_upcycle.py checks it).

The same mapping carries Adam's moments (`upcycle_optimizer_state`), so training continues on the
dense run's learning-rate schedule and statistics.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Params = Mapping[str, Any]


def _expert_copies(dense_ffn: Params, experts: Params, path: str, noise_std: float,
                   rng: jax.Array | None) -> dict[str, jax.Array]:
  """{'wi', 'wo'[, 'wi_gate']} [E, ...]: each the dense FFN's kernel repeated E times, plus
  noise_std * std(kernel) * N(0, 1) drawn independently for each expert when noise_std > 0."""
  copies = {}
  for i, (name, template) in enumerate(sorted(experts.items())):
    if name not in dense_ffn:
      raise ValueError(f'upcycling {path}/experts/{name}: the dense model has no '
                       f'{path.rsplit("/", 1)[0]}/mlp/{name} (GLU experts need a GLU dense model)')
    kernel = dense_ffn[name]['kernel']  # Shape: [D, F] or [F, D]
    if (template.shape[0], *kernel.shape) != template.shape:
      raise ValueError(
          f'upcycling {path}/experts/{name}: experts of shape {template.shape} cannot be copies '
          f'of the dense kernel {kernel.shape}; the dense source must be the MoE config with '
          'dense_baseline=True and num_selected_experts=1 (an FFN of one expert\'s width)')
    stacked = jnp.broadcast_to(kernel, template.shape).astype(template.dtype)  # [E, D, F]
    if noise_std > 0:
      noise = jax.random.normal(jax.random.fold_in(rng, i), template.shape, template.dtype)
      stacked = stacked + noise_std * jnp.std(kernel) * noise
    copies[name] = stacked
  return copies


def upcycle_tree(dense: Params, template: Params, noise_std: float = 0.0,
                 rng: jax.Array | None = None, path: str = '') -> dict[str, Any]:
  """MoE params from dense params: `template` is a freshly initialized MoE model's params (its
  routers are kept); each 'moe' module takes expert copies of the dense 'mlp' beside it, and every
  other leaf is the dense one at the same path (shapes must match). Pure.

  noise_std: std of the noise added to each expert, relative to each kernel's std (0: exact
  copies); rng: the noise key, one stream per sparse block (folded with the block's path).
  """
  if noise_std > 0 and rng is None:
    raise ValueError('upcycle_tree: noise_std > 0 needs an rng key')
  out = {}
  for name, value in template.items():
    here = f'{path}/{name}'
    if name == 'moe':
      if 'mlp' not in dense:
        raise ValueError(f'upcycling {here}: the dense model has no FFN at {path}/mlp')
      block_rng = None if rng is None else jax.random.fold_in(rng, zlib.crc32(here.encode()))
      experts = _expert_copies(dense['mlp'], value['experts'], here, noise_std, block_rng)
      out[name] = {**value, 'experts': experts}  # the router (and shared experts) stay fresh
    elif name not in dense:
      raise ValueError(f'upcycling: the dense model has no {here}')
    elif isinstance(value, Mapping):
      out[name] = upcycle_tree(dense[name], value, noise_std, rng, here)
    else:
      if jnp.shape(dense[name]) != jnp.shape(value):
        raise ValueError(f'upcycling {here}: dense shape {jnp.shape(dense[name])} differs from '
                         f'the MoE model\'s {jnp.shape(value)}')
      out[name] = jnp.asarray(dense[name], jnp.result_type(value))
  return out


def upcycle_optimizer_state(dense_state: Any, template_state: Any, template_params: Params) -> Any:
  """An optimizer state for the upcycled params, from the same optax chain's states of the dense
  run and of the fresh MoE model (`template_state`, for `template_params`).

  Each part shaped like the params (Adam's mu and nu) is upcycled without noise, the routers'
  moments staying fresh; a params-structured part of other shapes (Adafactor's factored
  statistics) stays fresh; every other leaf (step counts, which drive the schedule) is the dense
  run's.
  """
  params_shapes = jax.tree.map(jnp.shape, template_params)

  def carry(template, dense):
    if not isinstance(template, Mapping):
      return dense
    if jax.tree.map(jnp.shape, template) == params_shapes:
      return upcycle_tree(dense, template)
    return template

  return jax.tree.map(carry, template_state, dense_state,
                      is_leaf=lambda node: isinstance(node, Mapping))
