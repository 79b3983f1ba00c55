"""The layers' argument checks: every field of MoeLayer and SoftMoeLayer against what it may be,
run when the layer is built, so a bad setting fails at once with a ConfigError naming the field
(`MoeLayer.top_p=0.0 is invalid: ...`). The tables of valid names live in the modules that
implement them (routing methods and load-balancing scales in `routing`, dispatch methods in
`dispatch`, routers in `routers`, activations in `experts`).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from moejax.dispatch import DISPATCH_METHODS
from moejax.errors import ConfigError
from moejax.experts import ACTIVATIONS
from moejax.routers import ROUTERS
from moejax.routing import (GROUP_SCORES, LOAD_BALANCING_SCALES, ROUTING_METHODS,
                            SCORE_FUNCTIONS, UNSELECTED_GROUP_FILLS)

ROUTER_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _bad(layer: Any, field: str, allowed: str) -> ConfigError:
  return ConfigError(field, getattr(layer, field), allowed, type(layer).__name__)


def _check_choice(layer: Any, field: str, choices) -> None:
  if getattr(layer, field) not in choices:
    raise _bad(layer, field, f'it must be one of {tuple(choices)}')


def check_moe_layer(layer: Any) -> None:
  """Every MoeLayer field alone, then the combinations that cannot work together."""
  _check_sizes(layer)
  for field, choices in (('routing', ROUTING_METHODS), ('dispatch', DISPATCH_METHODS),
                         ('activation', ACTIVATIONS), ('router', ROUTERS),
                         ('load_balancing_loss_scale', LOAD_BALANCING_SCALES),
                         ('score_function', SCORE_FUNCTIONS), ('group_score', GROUP_SCORES),
                         ('unselected_group_fill', UNSELECTED_GROUP_FILLS)):
    _check_choice(layer, field, choices)
  _check_routing(layer)
  _check_router(layer)
  _check_scores(layer)
  _check_experts(layer)


def _check_sizes(layer: Any) -> None:
  bad = lambda field, allowed: _bad(layer, field, allowed)
  if not isinstance(layer.num_experts, int) or layer.num_experts < 1:
    raise bad('num_experts', 'it must be an integer >= 1')
  if layer.ffn_dim < 1:
    raise bad('ffn_dim', 'it must be >= 1')
  if not 1 <= layer.num_selected_experts <= layer.num_experts:
    raise bad('num_selected_experts', f'it must be in [1, num_experts={layer.num_experts}]')
  for field in ('train_capacity_factor', 'eval_capacity_factor'):
    factor = getattr(layer, field)
    if factor is not None and not factor > 0:
      raise bad(field, 'it must be > 0, or None for dropless')
    if factor is None and layer.routing == 'experts_choose':
      raise bad(field, 'experts-choose routing needs a capacity factor')
  if layer.block_size is not None and (layer.block_size < 1
                                       or layer.block_size & (layer.block_size - 1)):
    raise bad('block_size', 'it must be a power of two, or None')
  if layer.min_expert_capacity < 1:
    raise bad('min_expert_capacity', 'it must be >= 1')
  if layer.group_size is not None and layer.group_size < 1:
    raise bad('group_size', 'it must be >= 1, or None')
  for field in ('jitter_noise', 'expert_dropout'):
    if not 0 <= getattr(layer, field) < 1:
      raise bad(field, 'it must be in [0, 1)')
  if layer.num_shared_experts < 0:
    raise bad('num_shared_experts', 'it must be >= 0')
  if layer.shared_expert_gate and not layer.num_shared_experts:
    raise bad('shared_expert_gate', 'it gates the shared experts: set num_shared_experts >= 1')
  if layer.expert_capacity is not None and layer.expert_capacity < 1:
    raise bad('expert_capacity', 'it must be >= 1, or None')
  if layer.decode_length is not None:
    if layer.decode_length < 1 or (layer.group_size and layer.decode_length % layer.group_size):
      raise bad('decode_length', 'it must be >= 1 and a multiple of group_size, or None')
    if not layer.causal or layer.routing == 'experts_choose':
      raise bad('decode_length', 'decoding routes a group token by token: causal routing only')
  if layer.router_dim < 1:
    raise bad('router_dim', 'it must be >= 1')
  if not layer.gumbel_temperature > 0:
    raise bad('gumbel_temperature', 'it must be > 0')
  if jnp.dtype(layer.router_dtype) not in ROUTER_DTYPES:
    raise bad('router_dtype', 'it must be float32, bfloat16 or float16')


def _check_routing(layer: Any) -> None:
  bad = lambda field, allowed: _bad(layer, field, allowed)
  if layer.causal and layer.routing == 'experts_choose':
    raise bad('routing', 'experts-choose routing ranks all tokens of a group, later ones '
              'included; it is for encoders only (causal=False)')
  if layer.causal and layer.batch_prioritized:
    raise bad('batch_prioritized', 'it orders tokens by router confidence, looking at later '
              'tokens; it is for encoders only (causal=False)')
  if layer.routing != 'tokens_choose' and (layer.batch_prioritized or layer.random_routing):
    raise bad('routing', "batch_prioritized and random_routing apply only to routing="
              "'tokens_choose'")
  if layer.top_p is not None and not (0 < layer.top_p <= 1 and layer.num_selected_experts >= 2
                                      and layer.routing == 'tokens_choose'
                                      and not layer.random_routing and not layer.balancing_bias
                                      and layer.score_function == 'softmax'
                                      and not layer.softmax_after_top_k
                                      and layer.num_selected_groups is None):
    raise bad('top_p', "it must be in (0, 1], with routing='tokens_choose', "
              "num_selected_experts >= 2 (the cap), score_function='softmax', and none of "
              'random_routing, balancing_bias, softmax_after_top_k, num_selected_groups')


def _check_router(layer: Any) -> None:
  bad = lambda field, allowed: _bad(layer, field, allowed)
  if layer.router in ('gumbel', 'hash') and (layer.routing != 'tokens_choose'
                                             or layer.num_selected_experts != 1):
    raise bad('router', "it routes top-1: it needs routing='tokens_choose' and "
              'num_selected_experts=1')
  if layer.router_bias and layer.router not in ('linear', 'gumbel'):
    raise bad('router_bias', "only the 'linear' and 'gumbel' routers have a bias")
  if layer.router == 'hash' and layer.jitter_noise:
    raise bad('jitter_noise', 'hash routing ignores the input')
  if layer.balancing_bias and (layer.routing != 'tokens_choose'
                               or layer.router in ('gumbel', 'hash')):
    raise bad('balancing_bias', "it biases top-K selection: it needs routing='tokens_choose' "
              "and a 'linear', 'cosine' or 'distance' router")


def _check_scores(layer: Any) -> None:
  """The score function, softmax after the top-k, group-limited top-k, routed scaling."""
  bad = lambda field, allowed: _bad(layer, field, allowed)
  top1_router = layer.router in ('gumbel', 'hash')
  if layer.score_function != 'softmax' and top1_router:
    raise bad('score_function', "the 'gumbel' and 'hash' routers weight by their own one-hot: "
              "use score_function='softmax'")
  if layer.softmax_after_top_k and (layer.routing != 'tokens_choose' or top1_router
                                    or layer.score_function != 'softmax'):
    raise bad('softmax_after_top_k', "it is a softmax over the chosen logits: it needs "
              "routing='tokens_choose', score_function='softmax' and a 'linear', 'cosine' or "
              "'distance' router")
  groups = layer.num_expert_groups
  if not isinstance(groups, int) or groups < 1 or layer.num_experts % groups:
    raise bad('num_expert_groups', f'it must be >= 1 and divide num_experts={layer.num_experts}')
  selected = layer.num_selected_groups
  if selected is not None:
    group_width = layer.num_experts // groups
    if not 1 <= selected <= groups:
      raise bad('num_selected_groups', f'it must be in [1, num_expert_groups={groups}], or None')
    if layer.routing != 'tokens_choose' or top1_router:
      raise bad('num_selected_groups', "it limits top-K choices: it needs routing="
                "'tokens_choose' and a 'linear', 'cosine' or 'distance' router")
    if layer.num_selected_experts > selected * group_width:
      raise bad('num_selected_groups', f'its {selected} groups of {group_width} experts must '
                f'hold num_selected_experts={layer.num_selected_experts}')
    if layer.group_score == 'top2_sum' and group_width < 2:
      raise bad('group_score', "'top2_sum' needs groups of at least 2 experts "
                f'(num_experts / num_expert_groups = {group_width})')
  if not layer.routed_scaling_factor > 0:
    raise bad('routed_scaling_factor', 'it must be > 0')


def _check_experts(layer: Any) -> None:
  """The activation's clamp and GLU offset."""
  if layer.activation_limit is not None and not layer.activation_limit > 0:
    raise _bad(layer, 'activation_limit', 'it must be > 0, or None')
  if layer.glu_linear_offset and not layer.glu:
    raise _bad(layer, 'glu_linear_offset', 'it offsets the linear half of a GLU: set glu=True')


def check_soft_moe_layer(layer: Any) -> None:
  """SoftMoeLayer's fields: sizes, the activation, and causal=False (every slot sees every token
  of its group, later ones included)."""
  if layer.causal:
    raise _bad(layer, 'causal', 'every slot mixes all tokens of a group, later ones included; '
               'Soft MoE is for encoders only')
  for field in ('num_experts', 'ffn_dim', 'slots_per_expert'):
    if getattr(layer, field) < 1:
      raise _bad(layer, field, 'it must be >= 1')
  _check_choice(layer, 'activation', ACTIVATIONS)
