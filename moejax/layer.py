"""MoeLayer: a drop-in replacement for a Transformer FFN block, [B, L, D] -> [B, L, D].

Data flow (axis letters as in DESIGN.md):
  x [B, L, D] -> tokens [G, S, D] -> router logits [G, S, E] (float32) -> RoutingDecision
  -> dispatch -> expert buffers [E, G*C, D] -> experts -> combine -> [G, S, D] -> [B, L, D]

The layer sows its aux losses and routing metrics into the `intermediates` collection;
`collect_aux_losses` and `collect_routing_metrics` read them back from any model. With
`balancing_bias` it keeps DeepSeek-V3's per-expert bias in the `router_bias_state` collection;
`update_balancing_biases` updates it between steps.

Also here: `SoftMoeLayer` (Soft MoE, encoders only) and `fine_grained` (DeepSeekMoE's split of each
expert into m smaller ones).
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
BIAS_COLLECTION = 'router_bias_state'


def _config_error(field: str, value: Any, allowed: str, owner: str = 'MoeLayer') -> ValueError:
  return ValueError(f'{owner}.{field}={value!r} is invalid: {allowed}.')


def group_tokens(x: jax.Array, padding_mask: jax.Array | None, group_size: int | None,
                 owner: str = 'MoeLayer') -> tuple[jax.Array, jax.Array]:
  """x [B, L, D] -> tokens [G, S, D] and valid [G, S] (bool); S = group_size, or L when None."""
  if x.ndim != 3:
    raise ValueError(f'{owner} input must have rank 3 [batch, length, model_dim]; '
                     f'got shape {x.shape}.')
  batch, length, model_dim = x.shape
  if padding_mask is None:
    padding_mask = jnp.ones((batch, length), jnp.bool_)
  elif padding_mask.shape != (batch, length):
    raise ValueError(f'{owner} padding_mask must have shape [batch, length] = '
                     f'{(batch, length)} (True for real tokens); got {padding_mask.shape}.')
  size = length if group_size is None else group_size
  num_tokens = batch * length
  if num_tokens % size:
    raise _config_error('group_size', group_size,
                        f'it must divide the batch * length = {batch} * {length} = {num_tokens} '
                        f'tokens (pad the batch, or pick a divisor)', owner)
  num_groups = num_tokens // size
  tokens = x.reshape(num_groups, size, model_dim)
  return tokens, padding_mask.reshape(num_groups, size).astype(jnp.bool_)


def fine_grained(num_experts: int, expert_hidden_dim: int, num_selected_experts: int,
                 m: int) -> dict[str, int]:
  """DeepSeekMoE fine-grained experts: each expert split into m of width F / m, and m times as
  many chosen, E * m experts of width F / m, K * m chosen: the same per-token expert FLOPs
  (K * m * F / m = K * F) and parameters, more combinations. MoeLayer fields, to unpack into it."""
  if m < 1 or expert_hidden_dim % m:
    raise ValueError(f'fine_grained m={m!r} is invalid: it must be >= 1 and divide '
                     f'expert_hidden_dim={expert_hidden_dim}.')
  return dict(num_experts=num_experts * m, expert_hidden_dim=expert_hidden_dim // m,
              num_selected_experts=num_selected_experts * m)


def update_balancing_biases(bias_state: Any, rate: float) -> Any:
  """The 'router_bias_state' collection after one DeepSeek-V3 bias update of every layer.

  Each MoeLayer(balancing_bias=True) holds {'bias': [E], 'load': [E]} ([layers, E] under
  nn.scan); its bias moves by `routing.balancing_bias_update(bias, load, rate)`. Pure; call it
  after the gradient step with the collection the forward pass returned:

    out, state = model.apply({'params': params, 'router_bias_state': bias_state}, x, False,
                             mutable=['intermediates', 'router_bias_state'])
    bias_state = update_balancing_biases(state['router_bias_state'], rate=1e-3)
  """
  if not isinstance(bias_state, Mapping):
    return bias_state
  if 'bias' in bias_state and 'load' in bias_state:
    return {**bias_state, 'bias': routing.balancing_bias_update(bias_state['bias'],
                                                                bias_state['load'], rate)}
  return {name: update_balancing_biases(value, rate) for name, value in bias_state.items()}


def default_block_size(num_choices: int, num_experts: int) -> int:
  """Rows of the largest block for 'sorted' dispatch: the power of two at or above twice an
  expert's mean load, within [16, 1024]. With a capacity factor up to 2 every expert's rows then
  fit in one block, so each expert's weights are read once a pass (see
  `experts.block_expert_ffn`); dropless overflow goes through more blocks."""
  mean_rows = max(num_choices / num_experts, 1.0)
  return int(min(1024, max(16, 2 ** math.ceil(math.log2(2 * mean_rows)))))


def block_tile(block_size: int) -> int:
  """The unit each expert's rows are padded to for 'sorted' dispatch: block_size / 16, at least
  16 rows (fewer only for smaller blocks). An expert's last block is a multiple of it, so there
  are at most 16 block shapes to compile; the padding costs under tile / 2 rows per expert on
  average (at 4,096 tokens and E = 8: 64-row tiles, about 6% more rows)."""
  return min(block_size, max(16, block_size // 16))


class MoeLayer(nn.Module):
  """Sparse Mixture-of-Experts FFN (Switch / GShard routing, and the variants below).

  Soft MoE (slots as softmax-weighted mixtures of all tokens) is not a `routing` value: it has no
  discrete decision, so it is the separate `SoftMoeLayer` (encoders only). Fine-grained experts are
  a choice of fields: `MoeLayer(**fine_grained(E, F, K, m), ...)`.

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
      'auto': 'einsum' on TPU, else 'sorted' (the fastest measured on CPU at E = 8, 32 and
        128, top-1 and top-2, see benchmarks/RESULTS.md; and dropless would give the capacity
        paths E / K times the tokens' buffers).
    block_size: rows of the largest block for 'sorted' dispatch, a power of two; each expert's
      rows are padded to a tile of block_size / 16 rows, at least 16 (`block_tile`). None picks
      one from the shapes (`default_block_size`).
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
    router: how tokens are scored, all in float32 (tokens-choose routing takes top-K of them):
      'linear': a dense layer, logits = x W (Switch; the default).
      'cosine': X-MoE, cos(projected token, expert embedding) / learned temperature
        (`routing.CosineRouterLogits`, projection to `router_dim`).
      'distance': Gaussian kernel of the distance to learned expert centroids
        (`routing.DistanceRouterLogits`).
      'gumbel': linear logits, hard straight-through Gumbel-softmax top-1 (K = 1; noise from rng
        stream `gating` in training, temperature `gumbel_temperature`; combine weight 1). The
        aux losses and metrics use the noise-free softmax.
      'hash': fixed expert (id * prime) % E from the `token_ids` call argument; nothing learned,
        combine weight 1 (K = 1).
    router_dim: the cosine router's projection width (X-MoE: 16).
    gumbel_temperature: temperature of the soft probabilities whose gradient 'gumbel' uses.
    top_p: tokens-choose top-p ("dynamic") routing: each token takes the fewest experts whose
      probabilities sum to >= top_p, at most num_selected_experts (K >= 2; K also sets the
      capacity). None: always K.
    balancing_bias: DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias, variable 'bias'
      [E] in the 'router_bias_state' collection, is added to the router probabilities to pick
      the experts (the combine weights use the unbiased probabilities). When that collection is
      mutable the layer stores the expert usage of the call in its variable 'load' [E];
      `update_balancing_biases` then moves the bias (outside the gradient; the train step does).
    num_shared_experts: experts every (real) token goes through besides its routed ones
      (DeepSeekMoE); their outputs are added, weight 1. Params 'shared_experts'.
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
  router: str = 'linear'
  router_dim: int = 16
  gumbel_temperature: float = 1.0
  top_p: float | None = None
  balancing_bias: bool = False
  num_shared_experts: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    self._check_config()
    self._check_router_config()
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
    if self.block_size is not None and (self.block_size < 1
                                        or self.block_size & (self.block_size - 1)):
      raise _config_error('block_size', self.block_size, 'it must be a power of two, or None')
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

  def _check_router_config(self):
    if self.router not in routing.ROUTERS:
      raise _config_error('router', self.router, f'it must be one of {routing.ROUTERS}')
    if self.router in ('gumbel', 'hash') and (self.routing != 'tokens_choose'
                                              or self.num_selected_experts != 1):
      raise _config_error('router', self.router, "it routes top-1: it needs routing="
                          "'tokens_choose' and num_selected_experts=1")
    if self.router_bias and self.router not in ('linear', 'gumbel'):
      raise _config_error('router_bias', self.router_bias,
                          "only the 'linear' and 'gumbel' routers have a bias")
    if self.router == 'hash' and self.jitter_noise:
      raise _config_error('jitter_noise', self.jitter_noise, 'hash routing ignores the input')
    if self.router_dim < 1:
      raise _config_error('router_dim', self.router_dim, 'it must be >= 1')
    if not self.gumbel_temperature > 0:
      raise _config_error('gumbel_temperature', self.gumbel_temperature, 'it must be > 0')
    if self.num_shared_experts < 0:
      raise _config_error('num_shared_experts', self.num_shared_experts, 'it must be >= 0')
    if self.top_p is not None and not (0 < self.top_p <= 1 and self.num_selected_experts >= 2
                                       and self.routing == 'tokens_choose'
                                       and not self.random_routing and not self.balancing_bias):
      raise _config_error('top_p', self.top_p, "it must be in (0, 1], with routing="
                          "'tokens_choose', num_selected_experts >= 2 (the cap), and neither "
                          'random_routing nor balancing_bias')
    if self.balancing_bias and (self.routing != 'tokens_choose'
                                or self.router in ('gumbel', 'hash')):
      raise _config_error('balancing_bias', self.balancing_bias, "it biases top-K selection: it "
                          "needs routing='tokens_choose' and a 'linear', 'cosine' or 'distance' "
                          'router')

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
    return group_tokens(x, padding_mask, self.group_size, type(self).__name__)

  def _route(self, scores: dict[str, jax.Array], valid: jax.Array, draws: jax.Array | None,
             deterministic: bool) -> routing.RoutingDecision:
    probs = scores['probs']  # Shape: [G, S, E]
    capacity = self.capacity(probs.shape[1], deterministic)
    if self.routing == 'dense':
      return routing.dense_routing(probs, valid)
    if self.routing == 'experts_choose':
      return routing.experts_choose_routing(probs, valid, capacity=capacity, causal=self.causal)
    return routing.top_k_routing(
        probs, valid, num_selected_experts=self.num_selected_experts, capacity=capacity,
        causal=self.causal, normalize_weights=self.normalize_weights,
        batch_prioritized=self.batch_prioritized, random_routing_draws=draws,
        selection_scores=scores.get('selection'), top_p=self.top_p)

  def _route_and_run(self, tokens: jax.Array, scores: dict[str, jax.Array], valid: jax.Array,
                     weights: dict[str, jax.Array], draws: jax.Array | None,
                     dropout_rng: jax.Array | None, *, deterministic: bool,
                     sharded: bool) -> tuple[jax.Array, routing.RoutingDecision]:
    """Route, dispatch, run the experts, combine: tokens [G, S, D] -> [G, S, D], and the decision.

    scores: 'probs' [G, S, E], what routing weights by (and ranks by, unless 'selection'
    [G, S, E] is given). A pure function of its arrays. With `sharded`, it runs on each device
    inside `jax.shard_map` on that device's groups, and the expert buffers travel to the devices
    that own their experts and back with two all-to-alls.
    """
    decision = self._route(scores, valid, draws, deterministic)
    method = self.dispatch_method(sharded)
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

  def dispatch_method(self, sharded: bool) -> str:
    """The dispatch method this layer runs: 'auto' resolved by backend, 'sorted' under an
    expert-parallel mesh replaced by 'indices' (the exchange moves [E, G, C, D] buffers)."""
    method = self.dispatch
    if method == 'auto':
      method = 'einsum' if jax.default_backend() == 'tpu' else 'sorted'
    return 'indices' if sharded and method == 'sorted' else method

  def _run_sorted(self, tokens: jax.Array, decision: routing.RoutingDecision,
                  weights: dict[str, jax.Array], dropout_rng: jax.Array | None) -> jax.Array:
    """tokens [G, S, D] -> [G, S, D] through expert blocks of the dispatched rows only."""
    num_choices = decision.expert_index.size
    block_size = self.block_size or default_block_size(num_choices, self.num_experts)
    dispatcher = SortedDispatcher.from_decision(decision, self.dtype, block_tile(block_size))
    rows = dispatcher.dispatch_rows(tokens.astype(self.dtype))  # Shape: [R, D]
    rows = block_expert_ffn(rows, dispatcher.first_row, dispatcher.row_count, weights,
                            block_size=block_size, tile=dispatcher.tile,
                            activation=self.activation, dtype=self.dtype,
                            dropout_rate=self.expert_dropout, dropout_rng=dropout_rng)
    return dispatcher.combine_rows(rows)

  def _sow_metrics(self, logits: jax.Array, probs: jax.Array, decision: routing.RoutingDecision,
                   valid: jax.Array) -> jax.Array:
    """Sow the aux losses and metrics; returns the layer's expert usage [E]."""
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
    return metrics['expert_usage']

  def _router_logits(self, tokens: jax.Array, token_ids: jax.Array | None,
                     deterministic: bool) -> jax.Array:
    """Router logits [G, S, E] (float32) of tokens [G, S, D] (token ids [G, S] for 'hash')."""
    if self.router == 'hash':
      if token_ids is None:
        raise ValueError("MoeLayer(router='hash') routes by token id: pass token_ids [batch, "
                         'length] to MoeLayer.__call__.')
      return routing.hash_logits(token_ids, self.num_experts)
    if self.router == 'cosine':
      router = routing.CosineRouterLogits(self.num_experts, dim=self.router_dim,
                                          init_scale=self.router_init_scale,
                                          jitter_noise=self.jitter_noise, name='router')
    elif self.router == 'distance':
      router = routing.DistanceRouterLogits(self.num_experts, init_scale=self.router_init_scale,
                                            jitter_noise=self.jitter_noise, name='router')
    else:  # 'linear', 'gumbel'
      router = routing.RouterLogits(self.num_experts, use_bias=self.router_bias,
                                    init_scale=self.router_init_scale,
                                    jitter_noise=self.jitter_noise, name='router')
    return router(tokens, deterministic)

  def _routing_scores(self, probs: jax.Array, logits: jax.Array,
                      deterministic: bool) -> dict[str, jax.Array]:
    """What routing reads: 'probs' [G, S, E] (the weights; Gumbel's straight-through one-hot) and,
    with `balancing_bias`, 'selection' = probs + bias (what ranks the experts)."""
    if self.router == 'gumbel':
      noise_rng = None if deterministic else self.make_rng('gating')
      return {'probs': routing.gumbel_straight_through(logits, self.gumbel_temperature,
                                                       noise_rng)}
    if not self.balancing_bias:
      return {'probs': probs}
    bias = self.variable(BIAS_COLLECTION, 'bias', jnp.zeros, (self.num_experts,), jnp.float32)
    return {'probs': probs, 'selection': probs + jax.lax.stop_gradient(bias.value)}

  def _record_load(self, usage: jax.Array):
    """With `balancing_bias`, keep this call's expert usage [E] for the bias update."""
    load = self.variable(BIAS_COLLECTION, 'load', jnp.zeros, (self.num_experts,), jnp.float32)
    if self.is_mutable_collection(BIAS_COLLECTION) and not self.is_initializing():
      load.value = usage

  def _shared_experts(self, x: jax.Array, valid: jax.Array,
                      dropout_rng: jax.Array | None) -> jax.Array:
    """Sum of the shared experts on every token: x [B, L, D] -> [B, L, D], zeros on padding."""
    model_dim = x.shape[-1]
    weights = ExpertWeights(self.num_shared_experts, self.expert_hidden_dim, glu=self.glu,
                            init_scale=self.init_scale, param_dtype=self.param_dtype,
                            expert_axis=None, name='shared_experts')(model_dim)
    tokens = jnp.broadcast_to(x.reshape(1, -1, model_dim),
                              (self.num_shared_experts, x.size // model_dim, model_dim))
    # Shape: [E_shared, B * L, D]
    if dropout_rng is not None:
      dropout_rng = jax.random.fold_in(dropout_rng, 1)
    out = expert_ffn(tokens, weights, activation=self.activation, dtype=self.dtype,
                     dropout_rate=self.expert_dropout, dropout_rng=dropout_rng).sum(axis=0)
    return jnp.where(valid.reshape(-1, 1), out, 0).astype(self.dtype).reshape(x.shape)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, padding_mask: jax.Array | None = None,
               token_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, L, D]; padding_mask: [B, L], True for real tokens (padding is never dispatched and
    gets zeros). deterministic: evaluation mode (eval capacity, no noise, no dropout).
    token_ids: [B, L] int, the input token ids; needed by (only) router='hash'."""
    tokens, valid = self._group(x, padding_mask)  # Shapes: [G, S, D], [G, S]
    if token_ids is not None:
      if token_ids.shape != x.shape[:2]:
        raise ValueError(f'MoeLayer token_ids must have shape [batch, length] = {x.shape[:2]}; '
                         f'got {token_ids.shape}.')
      token_ids = token_ids.reshape(valid.shape)  # Shape: [G, S]
    logits = self._router_logits(tokens, token_ids, deterministic)  # Shape: [G, S, E], float32
    probs = jax.nn.softmax(logits, axis=-1)  # Shape: [G, S, E], float32
    scores = self._routing_scores(probs, logits, deterministic)
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
    out, decision = route_and_run(tokens, scores, valid, weights, draws, dropout_rng)
    usage = self._sow_metrics(logits, probs, decision, valid)
    if self.balancing_bias:
      self._record_load(usage)
    out = out.reshape(x.shape)
    if self.num_shared_experts:
      out = out + self._shared_experts(x, valid, dropout_rng)
    return out


class SoftMoeLayer(nn.Module):
  """Soft MoE (Puigcerver et al., 2023): [B, L, D] -> [B, L, D], no discrete routing, no drops.

  Per group of S tokens, each of the E * P slots (P = slots_per_expert) is a softmax-weighted
  mixture of all the group's real tokens (softmax over tokens), each expert runs on its P slots,
  and each token's output is a softmax-weighted mixture of all slot outputs (softmax over slots).
  Logits [G, S, E * P] = scale * l2norm(x) . l2norm(phi) in float32, phi [D, E * P] learned.
  Every slot sees every token of the group, later ones included: encoders only (causal=False;
  True raises). Padded tokens enter no slot and get zeros. No aux losses or metrics are sown.

  Attributes:
    num_experts: E >= 1. expert_hidden_dim: F.
    slots_per_expert: P >= 1.
    group_size: S, tokens per group; None: each sequence is a group.
    activation, glu, init_scale, dtype, param_dtype: as in MoeLayer.
    causal: must be False (the field mirrors MoeLayer's, so a decoder cannot use it by mistake).
  """
  num_experts: int
  expert_hidden_dim: int
  slots_per_expert: int = 1
  group_size: int | None = None
  activation: str = 'relu'
  glu: bool = False
  causal: bool = True
  init_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    owner = type(self).__name__
    if self.causal:
      raise _config_error('causal', self.causal, 'every slot mixes all tokens of a group, later '
                          'ones included; Soft MoE is for encoders only: set causal=False', owner)
    for field in ('num_experts', 'expert_hidden_dim', 'slots_per_expert'):
      if getattr(self, field) < 1:
        raise _config_error(field, getattr(self, field), 'it must be >= 1', owner)
    if self.activation not in ACTIVATIONS:
      raise _config_error('activation', self.activation,
                          f'it must be one of {tuple(ACTIVATIONS)}', owner)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               padding_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, D]; padding_mask: [B, L], True for real tokens. `deterministic` is accepted for
    MoeLayer's signature; Soft MoE has no noise or dropout."""
    del deterministic
    tokens, valid = group_tokens(x, padding_mask, self.group_size, type(self).__name__)
    num_groups, model_dim = tokens.shape[0], tokens.shape[-1]
    num_slots = self.num_experts * self.slots_per_expert
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
    phi = self.param('phi', nn.with_logical_partitioning(init, ('embed', None)),
                     (model_dim, num_slots), jnp.float32)  # Shape: [D, E * P]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ()), (),
                       jnp.float32)
    normed = routing.l2_normalize(tokens.astype(jnp.float32), -1)  # Shape: [G, S, D]
    logits = scale * jnp.einsum('gsd,dn->gsn', normed,
                                routing.l2_normalize(phi, 0))  # Shape: [G, S, E * P]
    dispatch = jax.nn.softmax(jnp.where(valid[..., None], logits, -1e9), axis=1)  # over tokens
    combine = jax.nn.softmax(logits, axis=-1)  # Shape: [G, S, E * P], over slots
    slots = jnp.einsum('gsn,gsd->ngd', dispatch.astype(self.dtype), tokens.astype(self.dtype))
    # Shape: [E * P, G, D] -> [E, P * G, D]
    slots = slots.reshape(self.num_experts, self.slots_per_expert * num_groups, model_dim)
    weights = ExpertWeights(self.num_experts, self.expert_hidden_dim, glu=self.glu,
                            init_scale=self.init_scale, param_dtype=self.param_dtype,
                            name='experts')(model_dim)
    outputs = expert_ffn(slots, weights, activation=self.activation, dtype=self.dtype)
    outputs = outputs.reshape(num_slots, num_groups, model_dim)  # Shape: [E * P, G, D]
    out = jnp.einsum('gsn,ngd->gsd', combine.astype(self.dtype), outputs)  # Shape: [G, S, D]
    return jnp.where(valid[..., None], out, 0).astype(self.dtype).reshape(x.shape)


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
