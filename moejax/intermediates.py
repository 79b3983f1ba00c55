"""Reading back what MoE layers sow: aux losses, routing metrics and routing decisions.

Every MoeLayer call sows into the `intermediates` collection its 'load_balancing_loss',
'router_z_loss', 'fraction_dropped', 'expert_usage' [E], 'router_confidence' and 'router_max_logit'
(the largest |router logit| of its real tokens), and, when the 'decisions' collection is mutable,
its `RoutingDecision` under 'decision' and its router probabilities [G, S, E] under
'router_probs'. These helpers find them in what any model returns, however deep and whether or not
it uses `nn.scan` (whose layers carry a leading layer axis):

  linen:  out, state = model.apply(variables, x, ..., mutable=['intermediates'])
  NNX:    out = model(x, ...); state = nnx.pop(model, nnx.Intermediate)
  then:   collect_aux_losses(state), collect_routing_metrics(state), per_layer_metrics(state)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from moejax.routing import RoutingDecision

AUX_LOSS_NAMES = ('load_balancing_loss', 'router_z_loss')
ROUTING_METRIC_NAMES = ('fraction_dropped', 'expert_usage', 'router_confidence',
                        'router_max_logit')
MAX_OVER_LAYERS = ('router_max_logit',)  # collected as the max over layers, the others the mean
PER_LAYER = ('expert_usage', 'fraction_dropped', 'router_z_loss', 'load_balancing_loss',
             'router_confidence', 'router_max_logit')
DECISIONS = 'decisions'  # the collection a layer sows its RoutingDecision into, when mutable


def _plain(tree: Any) -> Any:
  """Nested dicts of arrays from a linen variables dict or an NNX `State` / `Variable`."""
  if hasattr(tree, 'to_pure_dict'):  # nnx.State
    return nnx.to_pure_dict(tree)
  if hasattr(tree, 'get_value') and not isinstance(tree, Mapping):  # an nnx.Variable
    return tree.get_value()
  return tree


def _find_sown(tree: Any, name: str) -> list[jax.Array]:
  """Every value sown under `name` anywhere in a (nested) intermediates tree."""
  found = []
  tree = _plain(tree)
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      value = _plain(value)
      if key == name:
        found.extend(value if isinstance(value, (tuple, list)) else [value])
      else:
        found.extend(_find_sown(value, name))
  return found


def _over_layers(values: list[jax.Array], name: str, per_layer_ndim: int,
                 reduce=jnp.mean) -> jax.Array:
  """Mean (or `reduce`) over MoE layers; leading axes beyond `per_layer_ndim` (nn.scan's) are
  layers too."""
  if not values:
    raise ValueError(f'no {name!r} found in the intermediates: run the model with '
                     "mutable=['intermediates'] (NNX: nnx.pop(model, nnx.Intermediate)) and pass "
                     'what it returns')
  shapes = {np.shape(v)[np.ndim(v) - per_layer_ndim:] for v in values}
  if len(shapes) > 1:
    raise ValueError(f'{name!r} has different shapes in different layers: {sorted(shapes)}')
  (shape,) = shapes
  stacked = jnp.concatenate([jnp.reshape(v, (-1, *shape)) for v in values])
  return reduce(stacked, axis=0)


def collect_aux_losses(intermediates: Any) -> dict[str, jax.Array]:
  """{'load_balancing_loss', 'router_z_loss'} averaged over every MoE layer call in the tree.

  Accepts the `intermediates` collection (or the whole mutable-variables dict) returned by
  `model.apply(..., mutable=['intermediates'])`, or NNX's `nnx.State` of `nnx.Intermediate`s.
  """
  return {name: _over_layers(_find_sown(intermediates, name), name, 0)
          for name in AUX_LOSS_NAMES}


def collect_routing_metrics(intermediates: Any) -> dict[str, jax.Array]:
  """{'fraction_dropped', 'expert_usage' [E], 'router_confidence'} averaged over MoE layers, and
  'router_max_logit', the max over them."""
  return {name: _over_layers(_find_sown(intermediates, name), name,
                             1 if name == 'expert_usage' else 0,
                             jnp.max if name in MAX_OVER_LAYERS else jnp.mean)
          for name in ROUTING_METRIC_NAMES}


def _layer_names(path: tuple[str, ...], stacked: int | None) -> list[str]:
  """Names of the MoE layer(s) at a sown path ('decoder/unit_0/block_1'), the collection and the
  'moe' module dropped. A scanned stack (`stacked` layers on a leading axis) is unstacked: moejax's
  'units' become 'unit_<i>', so a layer has the same name with and without nn.scan; other scanned
  modules get '[<i>]' appended."""
  layer = [p for p in path if p not in ('intermediates', DECISIONS, 'moe')]
  if stacked is None:
    return ['/'.join(layer)]
  if 'units' in layer:
    i = layer.index('units')
    return ['/'.join([*layer[:i], f'unit_{u}', *layer[i + 1:]]) for u in range(stacked)]
  return [f'{"/".join(layer)}[{u}]' for u in range(stacked)]


def per_layer_metrics(intermediates: Any) -> dict[str, jax.Array]:
  """{'<metric>/<layer>': value} for every MoE layer, e.g. 'expert_usage/decoder/unit_0/block_1'
  -> [E], for the metrics in PER_LAYER (scanned stacks unstacked, see `_layer_names`)."""
  out = {}
  for path, values in traverse_util.flatten_dict(_plain(intermediates)).items():
    name = path[-1]
    if name not in PER_LAYER:
      continue
    (value,) = _plain(values)  # one call per layer
    per_layer_ndim = 1 if name == 'expert_usage' else 0
    stacked = value.shape[0] if value.ndim > per_layer_ndim else None
    for i, layer in enumerate(_layer_names(path[:-1], stacked)):
      out[f'{name}/{layer}'] = value if stacked is None else value[i]
  return out


def _collect_per_layer(state: Any, name: str, per_call_ndim: int) -> dict[str, Any]:
  """{layer name: value} of every value sown under `name` (one per layer call; a leading axis
  beyond `per_call_ndim` is a scanned stack, unstacked and named as in `per_layer_metrics`)."""
  out = {}
  for path, values in traverse_util.flatten_dict(_plain(state)).items():
    if path[-1] != name:
      continue
    for call, value in enumerate(_plain(values)):
      ndim = jax.tree.leaves(value)[0].ndim
      stacked = jax.tree.leaves(value)[0].shape[0] if ndim > per_call_ndim else None
      for i, layer in enumerate(_layer_names(path[:-1], stacked)):
        key = layer if call == 0 else f'{layer}#{call}'
        out[key] = value if stacked is None else jax.tree.map(lambda a: a[i], value)
  return out


def collect_decisions(state: Any) -> dict[str, RoutingDecision]:
  """{layer name: RoutingDecision} of every MoE layer call, from what
  `model.apply(..., mutable=['decisions'])` returns.

  Each decision holds [G, S, K] arrays: expert_index, position, weight, chosen, dispatched.
  Layers of a scanned stack are unstacked (names as in `per_layer_metrics`); under nn.scan, give
  the scan `variable_axes={..., 'decisions': 0}`.
  """
  return _collect_per_layer(state, 'decision', 3)


def collect_router_probs(state: Any) -> dict[str, jax.Array]:
  """{layer name: router probabilities [G, S, E]} of every MoE layer call, sown into the
  'decisions' collection beside the decision (same names as `collect_decisions`)."""
  return _collect_per_layer(state, 'router_probs', 3)
