"""Where the train state and the batches live on a ('data', 'expert', 'model') mesh.

The params follow `moejax.sharding`'s partition rules (logical axis names by parameter path:
expert weights [E, D, F] split along E over 'expert' and F over 'model', the rest replicated).
Any other array of the state that mirrors a param (an optimizer moment of the same shape at the
same path) gets that param's sharding; everything else (step, rng, Adafactor's factored moments)
is replicated. Batches split along B over ('data', 'expert').
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax import sharding as moe_sharding
from moejax.train.inputs import model_inputs


def param_specs(model: nn.Module, batch: dict) -> Any:
  """PartitionSpecs of the model's params (abstract init: nothing is computed)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             *model_inputs(model.config, batch), True))
  return moe_sharding.param_specs(shapes['params'])


def _names(path) -> tuple:
  return tuple(moe_sharding.key_name(k) for k in path)


def state_shardings(state: Any, specs: Any, mesh: Mesh) -> Any:
  """NamedShardings for `state` (a TrainState, or a params tree) given the params' `specs`."""
  flat_specs = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, P))[0]
  by_path = {_names(path): spec for path, spec in flat_specs}
  shapes = {_names(path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                getattr(state, 'params', state))[0]}

  def sharding(path, leaf):
    names = _names(path)
    for start in range(len(names)):
      suffix = names[start:]
      if suffix in by_path and shapes.get(suffix) == leaf.shape:
        return NamedSharding(mesh, by_path[suffix])
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(sharding, state)
