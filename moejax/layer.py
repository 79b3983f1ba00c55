"""MoeLayer: a drop-in replacement for a Transformer FFN block, [B, L, D] -> [B, L, D].

Data flow (axis letters as in DESIGN.md):
  x [B, L, D] -> tokens [G, S, D] -> router logits [G, S, E] (float32) -> RoutingDecision
  -> dispatch -> expert buffers [E, G*C, D] -> experts -> combine -> [G, S, D] -> [B, L, D]

The layer sows its aux losses and routing metrics into the `intermediates` collection;
`collect_aux_losses` and `collect_routing_metrics` read them back from any model.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moejax import routing, sharding
from moejax.dispatch import DISPATCH_METHODS, SortedDispatcher, make_dispatcher
from moejax.experts import ACTIVATIONS, ExpertWeights, block_expert_ffn, expert_ffn
from moejax.experts import LOGICAL_AXES as EXPERT_AXES

ROUTING_METHODS = ('tokens_choose', 'experts_choose', 'dense')
AUX_LOSS_NAMES = ('load_balancing_loss', 'router_z_loss')
ROUTING_METRIC_NAMES = ('fraction_dropped', 'expert_usage', 'router_confidence')


def _config_error(field: str, value: Any, allowed: str) -> ValueError:
  return ValueError(f'MoeLayer.{field}={value!r} is invalid: {allowed}.')


def default_block_size(num_choices: int, num_experts: int) -> int:
  """Rows per block for 'sorted' dispatch: the power of two nearest below sqrt(32 x an expert's
  mean load), within [8, 128]. Smaller blocks pad less (half a block per expert on average), larger
  ones run faster matmuls; on the 2-core CPU of benchmarks/RESULTS.md this picked the best of the
  sizes tried (128 at 512 rows per expert, 64 at 128).
  """
  mean_rows = max(num_choices / num_experts, 1.0)
  return int(min(128, max(8, 2 ** math.floor(math.log2(math.sqrt(32 * mean_rows))))))


class MoeLayer(nn.Module):
  """Sparse Mixture-of-Experts FFN (Switch / GShard routing).

  Attributes:
    num_experts: E >= 1.
    expert_hidden_dim: F, the hidden width of each expert.
    num_selected_experts: K, experts per token for tokens-choose routing (1 <= K <= E); for
      experts-choose routing it sets capacity as the average number of experts per token.
    routing: 'tokens_choose' (top-K, Switch/GShard), 'experts_choose' (each expert takes its top-C
      tokens; encoders only) or 'dense' (every token to every expert, softmax-weighted).
    train_capacity_factor, eval_capacity_factor: capacity factor when not deterministic / when
      deterministic; C = ceil(factor * S * K / E), at least `min_expert_capacity`, at most S.
      None is dropless: C = S, so no token is ever dropped (with 'sorted' dispatch the experts
      still only compute the rows they get).
    min_expert_capacity: lower bound on C.
    group_size: S, tokens per routing group; None routes each sequence as one group (S = L). It
      must divide B * L.
    dispatch: how tokens reach their experts; every method gives the same numbers.
      'einsum': GShard's one-hot [G, S, E, C] tensors (MXU-friendly: the default on TPU).
      'indices': the same [E, G, C, D] buffers filled by gathers.
      'sorted': dispatched tokens sorted by expert into blocks of `block_size` rows; the experts
        run block by block, so empty capacity slots cost nothing. Under an expert-parallel mesh
        the all-to-all needs [E, G, C, D] buffers: it runs as 'indices'.
      'auto': 'einsum' on TPU; elsewhere 'sorted' when dropless (capacity S would make the
        buffers E / K times the tokens) and 'indices' otherwise (fastest measured on CPU, see
        benchmarks/RESULTS.md).
    block_size: rows per block for 'sorted' dispatch; None picks one from the shapes
      (`default_block_size`).
    activation: 'relu', 'gelu' or 'silu'. glu: gated experts (adds `wi_gate`).
    causal: the layer sits in a decoder. Routing then never looks at later tokens (see
      `routing.top_k_routing`), and experts-choose or batch-prioritized routing raise.
    normalize_weights: renormalize each token's top-K weights to sum to 1.
    random_routing: GShard random routing of choices 2..K during training (rng stream `gating`).
    batch_prioritized: claim slots in order of router confidence (encoders only).
    jitter_noise: multiplicative router-input noise U(1-eps, 1+eps) in training (stream `jitter`).
    router_bias: give the router a bias [E].
    router_init_scale, init_scale: truncated-normal fan-in init scales of the router kernel and of
      the expert weights (Switch used 0.1 for both).
    expert_dropout: dropout on the experts' hidden activations (stream `dropout`).
    dtype: compute dtype of dispatch, experts and combine (the router is always float32).
    param_dtype: storage dtype of the expert weights.
  """
  num_experts: int
  expert_hidden_dim: int
  num_selected_experts: int = 1
  routing: str = 'tokens_choose'
  train_capacity_factor: float | None = 1.25
  eval_capacity_factor: float | None = 2.0
  min_expert_capacity: int = 4
  group_size: int | None = None
  dispatch: str = 'auto'
  block_size: int | None = None
  activation: str = 'relu'
  glu: bool = False
  causal: bool = True
  normalize_weights: bool = False
  random_routing: bool = False
  batch_prioritized: bool = False
  jitter_noise: float = 0.0
  router_bias: bool = False
  router_init_scale: float = 1.0
  init_scale: float = 1.0
  expert_dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    self._check_config()
    super().__post_init__()

  def _check_config(self):
    if not isinstance(self.num_experts, int) or self.num_experts < 1:
      raise _config_error('num_experts', self.num_experts, 'it must be an integer >= 1')
    if self.expert_hidden_dim < 1:
      raise _config_error('expert_hidden_dim', self.expert_hidden_dim, 'it must be >= 1')
    if not 1 <= self.num_selected_experts <= self.num_experts:
      raise _config_error('num_selected_experts', self.num_selected_experts,
                          f'it must be in [1, num_experts={self.num_experts}]')
    for field in ('train_capacity_factor', 'eval_capacity_factor'):
      factor = getattr(self, field)
      if factor is not None and not factor > 0:
        raise _config_error(field, factor, 'it must be > 0, or None for dropless')
      if factor is None and self.routing == 'experts_choose':
        raise _config_error(field, factor, 'experts-choose routing needs a capacity factor')
    if self.block_size is not None and self.block_size < 1:
      raise _config_error('block_size', self.block_size, 'it must be >= 1, or None')
    if self.min_expert_capacity < 1:
      raise _config_error('min_expert_capacity', self.min_expert_capacity, 'it must be >= 1')
    if self.group_size is not None and self.group_size < 1:
      raise _config_error('group_size', self.group_size, 'it must be >= 1, or None')
    if self.routing not in ROUTING_METHODS:
      raise _config_error('routing', self.routing, f'it must be one of {ROUTING_METHODS}')
    if self.dispatch not in DISPATCH_METHODS:
      raise _config_error('dispatch', self.dispatch, f'it must be one of {DISPATCH_METHODS}')
    if self.activation not in ACTIVATIONS:
      raise _config_error('activation', self.activation, f'it must be one of {tuple(ACTIVATIONS)}')
    for field in ('jitter_noise', 'expert_dropout'):
      if not 0 <= getattr(self, field) < 1:
        raise _config_error(field, getattr(self, field), 'it must be in [0, 1)')
    if self.causal and self.routing == 'experts_choose':
      raise _config_error('routing', self.routing,
                          'experts-choose routing ranks all tokens of a group, later ones '
                          'included; it is for encoders only: set causal=False')
    if self.causal and self.batch_prioritized:
      raise _config_error('batch_prioritized', self.batch_prioritized,
                          'it orders tokens by router confidence, looking at later tokens; it is '
                          'for encoders only: set causal=False')
    if self.routing != 'tokens_choose' and (self.batch_prioritized or self.random_routing):
      raise _config_error('routing', self.routing, 'batch_prioritized and random_routing apply '
                          "only to routing='tokens_choose'")

  def capacity(self, group_size: int, deterministic: bool) -> int:
    """Expert capacity C per group of `group_size` tokens."""
    if self.routing == 'dense':
      return group_size
    factor = self.eval_capacity_factor if deterministic else self.train_capacity_factor
    if factor is None:  # dropless: an expert can take every token of the group
      return group_size
    return routing.expert_capacity(group_size, self.num_experts, self.num_selected_experts,
                                   factor, self.min_expert_capacity)

  def _group(self, x: jax.Array, padding_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """[B, L, D] -> tokens [G, S, D] and valid [G, S] (bool)."""
    if x.ndim != 3:
      raise ValueError(f'MoeLayer input must have rank 3 [batch, length, model_dim]; '
                       f'got shape {x.shape}.')
    batch, length, model_dim = x.shape
    if padding_mask is None:
      padding_mask = jnp.ones((batch, length), jnp.bool_)
    elif padding_mask.shape != (batch, length):
      raise ValueError(f'MoeLayer padding_mask must have shape [batch, length] = '
                       f'{(batch, length)} (True for real tokens); got {padding_mask.shape}.')
    group_size = length if self.group_size is None else self.group_size
    num_tokens = batch * length
    if num_tokens % group_size:
      raise _config_error('group_size', self.group_size,
                          f'it must divide the batch * length = {batch} * {length} = {num_tokens} '
                          f'tokens (pad the batch, or pick a divisor)')
    num_groups = num_tokens // group_size
    tokens = x.reshape(num_groups, group_size, model_dim)
    return tokens, padding_mask.reshape(num_groups, group_size).astype(jnp.bool_)

  def _route(self, probs: jax.Array, valid: jax.Array, draws: jax.Array | None,
             deterministic: bool) -> routing.RoutingDecision:
    capacity = self.capacity(probs.shape[1], deterministic)
    if self.routing == 'dense':
      return routing.dense_routing(probs, valid)
    if self.routing == 'experts_choose':
      return routing.experts_choose_routing(probs, valid, capacity=capacity, causal=self.causal)
    return routing.top_k_routing(
        probs, valid, num_selected_experts=self.num_selected_experts, capacity=capacity,
        causal=self.causal, normalize_weights=self.normalize_weights,
        batch_prioritized=self.batch_prioritized, random_routing_draws=draws)

  def _route_and_run(self, tokens: jax.Array, probs: jax.Array, valid: jax.Array,
                     weights: dict[str, jax.Array], draws: jax.Array | None,
                     dropout_rng: jax.Array | None, *, deterministic: bool,
                     sharded: bool) -> tuple[jax.Array, routing.RoutingDecision]:
    """Route, dispatch, run the experts, combine: tokens [G, S, D] -> [G, S, D], and the decision.

    A pure function of its arrays. With `sharded`, it runs on each device inside `jax.shard_map`
    on that device's groups, and the expert buffers travel to the devices that own their experts
    and back with two all-to-alls.
    """
    decision = self._route(probs, valid, draws, deterministic)
    method = self.dispatch_method(sharded, deterministic)
    if method == 'sorted':
      return self._run_sorted(tokens, decision, weights, dropout_rng), decision
    dispatcher = make_dispatcher(decision, method, self.dtype)
    buffers = dispatcher.dispatch(tokens.astype(self.dtype))  # Shape: [E, G, C, D]
    if sharded:
      buffers = sharding.to_expert_devices(buffers)  # Shape: [E_local, n_expert * G, C, D]
      dropout_rng = sharding.device_rng(dropout_rng)
    num_experts, model_dim = buffers.shape[0], buffers.shape[-1]
    expert_out = expert_ffn(buffers.reshape(num_experts, -1, model_dim), weights,
                            activation=self.activation, dtype=self.dtype,
                            dropout_rate=self.expert_dropout, dropout_rng=dropout_rng)
    expert_out = expert_out.reshape(buffers.shape)  # Shape: [E(_local), G(*n_expert), C, D]
    if sharded:
      expert_out = sharding.from_expert_devices(expert_out)  # Shape: [E, G, C, D]
    return dispatcher.combine(expert_out), decision  # Shape: [G, S, D]

  def dispatch_method(self, sharded: bool, deterministic: bool) -> str:
    """The dispatch method this layer runs: 'auto' resolved by backend and capacity, 'sorted'
    under an expert-parallel mesh replaced by 'indices' (the exchange moves [E, G, C, D]
    buffers)."""
    method = self.dispatch
    if method == 'auto':
      factor = self.eval_capacity_factor if deterministic else self.train_capacity_factor
      if jax.default_backend() == 'tpu':
        method = 'einsum'
      else:
        method = 'sorted' if factor is None and self.routing == 'tokens_choose' else 'indices'
    return 'indices' if sharded and method == 'sorted' else method

  def _run_sorted(self, tokens: jax.Array, decision: routing.RoutingDecision,
                  weights: dict[str, jax.Array], dropout_rng: jax.Array | None) -> jax.Array:
    """tokens [G, S, D] -> [G, S, D] through expert blocks of the dispatched rows only."""
    num_choices = decision.expert_index.size
    block_size = self.block_size or default_block_size(num_choices, self.num_experts)
    dispatcher = SortedDispatcher.from_decision(decision, self.dtype, block_size)
    rows = dispatcher.dispatch_rows(tokens.astype(self.dtype))  # Shape: [R, D]
    rows = block_expert_ffn(rows, dispatcher.first_block, dispatcher.block_count, weights,
                            block_size=block_size, activation=self.activation, dtype=self.dtype,
                            dropout_rate=self.expert_dropout, dropout_rng=dropout_rng)
    return dispatcher.combine_rows(rows)

  def _sow_metrics(self, logits: jax.Array, probs: jax.Array, decision: routing.RoutingDecision,
                   valid: jax.Array):
    token_weight = valid.sum(axis=1, dtype=jnp.float32)  # Shape: [G]
    usage = routing.expert_usage(decision)  # Shape: [G, E]
    metrics = {
        'load_balancing_loss': routing.load_balancing_loss(probs, decision, valid),
        'router_z_loss': routing.router_z_loss(logits, valid),
        'fraction_dropped': routing.fraction_dropped(decision),
        'expert_usage': token_weight @ usage / jnp.maximum(token_weight.sum(), 1.0),
        'router_confidence': routing.router_confidence(probs, decision, valid),
    }
    for name, value in metrics.items():
      self.sow('intermediates', name, value)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               padding_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, D]; padding_mask: [B, L], True for real tokens (padding is never dispatched and
    gets zeros). deterministic: evaluation mode (eval capacity, no noise, no dropout)."""
    tokens, valid = self._group(x, padding_mask)  # Shapes: [G, S, D], [G, S]
    logits = routing.RouterLogits(self.num_experts, use_bias=self.router_bias,
                                  init_scale=self.router_init_scale,
                                  jitter_noise=self.jitter_noise, name='router')(
                                      tokens, deterministic)  # Shape: [G, S, E], float32
    probs = jax.nn.softmax(logits, axis=-1)  # Shape: [G, S, E], float32
    weights = ExpertWeights(self.num_experts, self.expert_hidden_dim, glu=self.glu,
                            init_scale=self.init_scale, param_dtype=self.param_dtype,
                            name='experts')(x.shape[-1])
    draws = None  # GShard random routing: drawn here, over all groups, whatever the mesh
    if self.random_routing and not deterministic:
      draws = jax.random.uniform(self.make_rng('gating'),
                                 (*valid.shape, self.num_selected_experts))  # Shape: [G, S, K]
    use_dropout = self.expert_dropout > 0 and not deterministic
    dropout_rng = self.make_rng('dropout') if use_dropout else None
    mesh = sharding.active_mesh()
    route_and_run = functools.partial(self._route_and_run, deterministic=deterministic,
                                      sharded=mesh is not None)
    if mesh is not None:
      sharding.check_divisible(self.num_experts, tokens.shape[0], mesh)
      route_and_run = sharding.shard_map_layer(route_and_run, mesh,
                                                {k: EXPERT_AXES[k] for k in weights})
    out, decision = route_and_run(tokens, probs, valid, weights, draws, dropout_rng)
    self._sow_metrics(logits, probs, decision, valid)
    return out.reshape(x.shape)


def _find_sown(tree: Any, name: str) -> list[jax.Array]:
  """Every value sown under `name` anywhere in a (nested) intermediates tree."""
  found = []
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      if key == name:
        found.extend(value if isinstance(value, (tuple, list)) else [value])
      else:
        found.extend(_find_sown(value, name))
  return found


def _mean_over_layers(values: list[jax.Array], name: str, per_layer_ndim: int) -> jax.Array:
  """Mean over MoE layers; leading axes beyond `per_layer_ndim` (nn.scan's) are layers too."""
  if not values:
    raise ValueError(f'no {name!r} found in the intermediates: run the model with '
                     "mutable=['intermediates'] and pass what it returns")
  shapes = {np.shape(v)[np.ndim(v) - per_layer_ndim:] for v in values}
  if len(shapes) > 1:
    raise ValueError(f'{name!r} has different shapes in different layers: {sorted(shapes)}')
  (shape,) = shapes
  stacked = jnp.concatenate([jnp.reshape(v, (-1, *shape)) for v in values])
  return jnp.mean(stacked, axis=0)


def collect_aux_losses(intermediates: Any) -> dict[str, jax.Array]:
  """{'load_balancing_loss', 'router_z_loss'} averaged over every MoE layer call in the tree.

  Accepts the `intermediates` collection (or the whole mutable-variables dict) returned by
  `model.apply(..., mutable=['intermediates'])`, for plain and `nn.scan`-ned models alike.
  """
  return {name: _mean_over_layers(_find_sown(intermediates, name), name, 0)
          for name in AUX_LOSS_NAMES}


def collect_routing_metrics(intermediates: Any) -> dict[str, jax.Array]:
  """{'fraction_dropped', 'expert_usage' [E], 'router_confidence'} averaged over MoE layers."""
  return {name: _mean_over_layers(_find_sown(intermediates, name), name,
                                  1 if name == 'expert_usage' else 0)
          for name in ROUTING_METRIC_NAMES}
