"""MoeLayer: a drop-in replacement for a Transformer FFN block, [B, L, D] -> [B, L, D].

Data flow (axis letters as in DESIGN.md); `__call__` reads top to bottom, and the methods after it
follow the data through the layer:
  x [B, L, D] -> tokens [G, S, D] -> router logits [G, S, E] -> probabilities -> RoutingDecision
  -> dispatch -> expert buffers [E, G*C, D] (or expert-sorted rows [R, D]) -> experts -> combine
  -> [G, S, D] -> [B, L, D]

The layer sows its aux losses and routing metrics into the `intermediates` collection
(`moejax.intermediates` reads them back from any model) and, when the `decisions` collection is
mutable, its RoutingDecision. Its parameters are plain arrays: it needs no metadata under
`nn.scan`, and `moejax.sharding` names their axes by path.
"""
from __future__ import annotations

import functools
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax import exchange, platforms, routers, routing, sharding
from moejax.balancing import BIAS_COLLECTION
from moejax.checks import check_moe_layer
from moejax.dispatch import (BufferDispatcher, GroupedDispatcher, RowDispatcher, auto_dispatch,
                             block_tile, default_block_size, make_dispatcher)
from moejax.experts import (Activation, ExpertWeights, block_expert_ffn, expert_ffn,
                             grouped_expert_ffn)
from moejax.intermediates import DECISIONS


def fine_grained(num_experts: int, ffn_dim: int, num_selected_experts: int,
                 m: int) -> dict[str, int]:
  """DeepSeekMoE fine-grained experts (arXiv:2401.06066): each expert split into m of width F / m,
  and m times as many chosen, E * m experts of width F / m, K * m chosen: the same per-token
  expert FLOPs (K * m * F / m = K * F) and parameters, more combinations. MoeLayer fields, to
  unpack into it."""
  if m < 1 or ffn_dim % m:
    raise ValueError(f'fine_grained m={m!r} is invalid: it must be >= 1 and divide '
                     f'ffn_dim={ffn_dim}.')
  return dict(num_experts=num_experts * m, ffn_dim=ffn_dim // m,
              num_selected_experts=num_selected_experts * m)


class MoeLayer(nn.Module):
  """Sparse Mixture-of-Experts FFN (Switch / GShard routing, and the variants below).

  Soft MoE (slots as softmax-weighted mixtures of all tokens) is not a `routing` value: it has no
  discrete decision, so it is the separate `moejax.SoftMoeLayer` (encoders only). Fine-grained
  experts are a choice of fields: `MoeLayer(**fine_grained(E, F, K, m), ...)`.

  Attributes:
    num_experts: E >= 1.
    ffn_dim: F, the hidden width of each expert.
    num_selected_experts: K, experts per token for tokens-choose routing (1 <= K <= E); for
      experts-choose routing it sets capacity as the average number of experts per token.
    routing: 'tokens_choose' (top-K, Switch/GShard), 'experts_choose' (each expert takes its top-C
      tokens; encoders only) or 'dense' (every token to every expert, softmax-weighted).
    train_capacity_factor, eval_capacity_factor: capacity factor when not deterministic / when
      deterministic; C = ceil(factor * S * K / E), at least `min_expert_capacity`, at most S.
      None is dropless: C = S, so no token is ever dropped (with 'sorted' dispatch the experts
      still only compute the rows they get).
    min_expert_capacity: lower bound on C.
    expert_capacity: a fixed C per expert and group (at most S), in place of the capacity factors
      (Hugging Face's Switch Transformers); None: from the factors.
    group_size: S, tokens per routing group; None routes each sequence as one group (S = L). It
      must divide B * L.
    dispatch: how tokens reach their experts; every method gives the same numbers.
      'einsum': GShard's one-hot [G, S, E, C] tensors.
      'indices': the same [E, G, C, D] buffers filled by gathers.
      'sorted': dispatched tokens sorted by expert into blocks of `block_size` rows; the experts
        run block by block, so empty capacity slots cost nothing. Under an expert-parallel mesh
        the all-to-all needs [E, G, C, D] buffers: it runs as 'indices'.
      'grouped': dispatched tokens sorted by expert, the experts run as grouped matmuls
        (`jax.lax.ragged_dot`, MaxText's path on GPU); under an expert-parallel mesh the rows
        travel in a ragged exchange (`moejax.exchange`): only the tokens dispatched, no
        capacity buffers. On CPU the grouped matmuls cost E times the FLOPs.
      'auto': the fastest path measured on the platform traced for (`moejax.platforms`;
        `moejax.dispatch.auto_dispatch`: sorted on CPU, einsum on TPU and GPU, indices there
        when C = S; never grouped, not yet measured on a GPU or TPU; benchmarks/RESULTS.md).
    block_size: rows of the largest block for 'sorted' dispatch, a power of two; each expert's
      rows are padded to a tile of block_size / 16 rows, at least 16 (`dispatch.block_tile`).
      None picks one from the shapes (`dispatch.default_block_size`).
    activation: 'relu', 'gelu', 'silu' or 'quick_gelu' (x sigmoid(1.702 x), gpt-oss's).
      glu: gated experts (adds `wi_gate`): act(x wi) * (x wi_gate).
    activation_limit: clamp the activation's input above at this limit and, with `glu`, the
      linear half to [-limit, limit] (gpt-oss: 7.0); None clamps nothing.
    glu_linear_offset: added to the linear half of the GLU: act(x wi) * (x wi_gate + offset).
      gpt-oss's clamped SwiGLU is activation='quick_gelu', glu=True, activation_limit=7.0,
      glu_linear_offset=1.0.
    expert_bias: biases in every expert (gpt-oss): 'bi' [E, F] (and 'bi_gate'), 'bo' [E, D],
      zeros at init, the shared experts' too. A dropped token gets nothing from its expert,
      bias included.
    causal: the layer sits in a decoder. Routing then never looks at later tokens (see
      `routing.top_k_routing`), and experts-choose or batch-prioritized routing raise.
    normalize_weights: renormalize each token's top-K weights to sum to 1 (denominator + 1e-20,
      DeepSeek-V3's).
    score_function: what the router's logits become, the scores that choose and weight the
      experts: 'softmax' over the experts (Switch) or each expert's 'sigmoid' (DeepSeek-V3,
      GLM-4.5; weights then sum to 1 only with `normalize_weights`). With 'sigmoid' the
      load-balancing loss, the router confidence and the sown router probabilities read the
      sigmoid scores divided by their sum over the experts (DeepSeek-V3's balance loss does);
      the z-loss and 'router_max_logit' read the logits, as with softmax.
    softmax_after_top_k: tokens-choose weights are the softmax over the K chosen experts'
      logits (gpt-oss, with `router_bias`) instead of their softmax probabilities: the same
      numbers as softmax with `normalize_weights`, kept as the explicit option.
    num_expert_groups, num_selected_groups: group-limited top-k (DeepSeek-V2, -V3, GLM-4.5):
      the E experts form num_expert_groups groups of consecutive indices, and each token picks
      its K experts among its num_selected_groups best groups (None: all, no limit).
    group_score: how a group is ranked: 'max', its best expert's score (DeepSeek-V2's
      group_limited_greedy), or 'top2_sum', the sum of its two best (DeepSeek-V3's and
      GLM-4.5's noaux_tc). Both read the selection scores (bias-corrected with
      `balancing_bias`).
    unselected_group_fill: what the experts of groups not kept score in the top-k: 'zero'
      (transformers 4.57.6, which imported checkpoints are checked against) or 'neg_inf'
      (DeepSeek's released inference code). They differ only when kept experts' bias-corrected
      scores are negative: 'zero' then lets experts of groups not kept win.
    routed_scaling_factor: multiplies the combine weights, after `normalize_weights`
      (DeepSeek-V2/V3's routed_scaling_factor).
    random_routing: GShard random routing of choices 2..K during training (rng stream `gating`).
    batch_prioritized: claim slots in order of router confidence (V-MoE; encoders only).
    jitter_noise: multiplicative router-input noise U(1-eps, 1+eps) in training (stream `jitter`).
    router: how tokens are scored (`moejax.routers`); tokens-choose routing takes top-K of them:
      'linear': a dense layer, logits = x W (Switch; the default).
      'cosine': X-MoE, cos(projected token, expert embedding) / learned temperature
        (projection to `router_dim`).
      'distance': Gaussian kernel of the distance to learned expert centroids.
      'gumbel': linear logits, hard straight-through Gumbel-softmax top-1 (K = 1; noise from rng
        stream `gating` in training, temperature `gumbel_temperature`; combine weight 1). The
        aux losses and metrics use the noise-free softmax.
      'hash': fixed expert (id * prime) % E from the `token_ids` call argument; nothing learned,
        combine weight 1 (K = 1).
    router_bias: give the linear (or Gumbel) router a learned bias [E].
    router_dim: the cosine router's projection width (X-MoE: 16).
    gumbel_temperature: temperature of the soft probabilities whose gradient 'gumbel' uses.
    router_dtype: the router's compute dtype, logits and softmax included (float32: Switch's
      selective precision; bfloat16 reproduces its ablation). Routing decisions, aux losses and
      metrics are then computed in float32 from those probabilities.
    router_init_scale, init_scale: truncated-normal fan-in init scales of the router kernel and of
      the expert weights (Switch used 0.1 for both).
    expert_dropout: dropout on the experts' hidden activations (stream `dropout`).
    top_p: tokens-choose top-p ("dynamic") routing: each token takes the fewest experts whose
      probabilities sum to >= top_p, at most num_selected_experts (K >= 2; K also sets the
      capacity). None: always K.
    balancing_bias: DeepSeek-V3 auxiliary-loss-free balancing (`moejax.balancing`): a per-expert
      bias, variable 'bias' [E] in the 'balancing_bias_state' collection, is added to the router
      scores (softmax or sigmoid) to pick the experts (the combine weights use the unbiased
      scores; DeepSeek-V3's e_score_correction_bias).
      When that collection is mutable the layer stores the expert usage of the call in 'load'.
    num_shared_experts: experts every (real) token goes through besides its routed ones
      (DeepSeekMoE); their outputs are added, weight 1. Params 'shared_experts'.
    shared_expert_gate: scale the shared experts' sum by sigmoid(x w), w [D, 1] (param
      'shared_expert_gate'; Qwen-MoE's gated shared expert).
    load_balancing_loss_scale: the convention of the sown 'load_balancing_loss':
      'per_choice' (1 at uniform routing for every K) or 'per_token' (K at uniform routing:
      GShard's, flaxformer's and ST-MoE's top-K value); see `routing.load_balancing_loss`.
    dtype: compute dtype of dispatch, experts and combine.
    param_dtype: storage dtype of the expert weights, the shared experts and their gate; the
      router's params are float32 whatever it is (`moejax.routers`).
    decode_length: decode sequences of this length a few tokens at a time (a model sampling with a
      KV cache sets it; not a ModelConfig field): each call takes the next T tokens of every
      sequence (the 'cache' collection holds where they start and each expert's slots taken so
      far in the current group), routed with the capacity of a whole group (`group_size`, or
      decode_length), so a token is dropped exactly when the full sequence would drop it. Causal
      routing; a call must not cross a group's end.
  """
  num_experts: int
  ffn_dim: int
  num_selected_experts: int = 1
  routing: str = 'tokens_choose'
  train_capacity_factor: float | None = 1.25
  eval_capacity_factor: float | None = 2.0
  min_expert_capacity: int = 4
  expert_capacity: int | None = None
  group_size: int | None = None
  dispatch: str = 'auto'
  block_size: int | None = None
  activation: str = 'relu'
  glu: bool = False
  activation_limit: float | None = None
  glu_linear_offset: float = 0.0
  expert_bias: bool = False
  causal: bool = True
  normalize_weights: bool = False
  score_function: str = 'softmax'
  softmax_after_top_k: bool = False
  num_expert_groups: int = 1
  num_selected_groups: int | None = None
  group_score: str = 'max'
  unselected_group_fill: str = 'zero'
  routed_scaling_factor: float = 1.0
  random_routing: bool = False
  batch_prioritized: bool = False
  jitter_noise: float = 0.0
  router: str = 'linear'
  router_bias: bool = False
  router_dim: int = 16
  gumbel_temperature: float = 1.0
  router_dtype: Any = jnp.float32
  router_init_scale: float = 1.0
  init_scale: float = 1.0
  expert_dropout: float = 0.0
  top_p: float | None = None
  balancing_bias: bool = False
  num_shared_experts: int = 0
  shared_expert_gate: bool = False
  load_balancing_loss_scale: str = 'per_choice'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  decode_length: int | None = None

  def __post_init__(self):
    check_moe_layer(self)
    super().__post_init__()

  @property
  def expert_activation(self) -> Activation:
    """The experts' (and shared experts') hidden units (`experts.Activation`)."""
    return Activation(self.activation, self.activation_limit, self.glu_linear_offset)

  def capacity(self, group_size: int, deterministic: bool) -> int:
    """Expert capacity C per group of `group_size` tokens."""
    if self.routing == 'dense':
      return group_size
    if self.expert_capacity is not None:
      return min(self.expert_capacity, group_size)
    factor = self.eval_capacity_factor if deterministic else self.train_capacity_factor
    if factor is None:  # dropless: an expert can take every token of the group
      return group_size
    return routing.expert_capacity(group_size, self.num_experts, self.num_selected_experts,
                                   factor, self.min_expert_capacity)

  def dispatch_method(self, sharded: bool, deterministic: bool) -> str:
    """The dispatch method this layer runs: 'auto' resolved by `dispatch.auto_dispatch`, and
    'sorted' under an expert-parallel mesh replaced by 'indices' (the exchange moves
    [E, G, C, D] buffers); 'grouped' rows travel in a ragged exchange."""
    method = self.dispatch
    if method == 'auto':
      factor = self.eval_capacity_factor if deterministic else self.train_capacity_factor
      # Dense routing, like dropless, gives every expert C = S slots per group.
      dropless = self.routing == 'dense' or (factor is None and self.expert_capacity is None
                                             and self.routing == 'tokens_choose')
      method = auto_dispatch(platforms.target_platform(), dropless)
    return 'indices' if sharded and method == 'sorted' else method

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, padding_mask: jax.Array | None = None,
               token_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, L, D]; padding_mask: [B, L], True for real tokens (padding is never dispatched and
    gets zeros). deterministic: evaluation mode (eval capacity, no noise, no dropout).
    token_ids: [B, L] int, the input token ids; read by (only) router='hash'."""
    if self.decode_length is None:
      tokens, valid = routing.group_tokens(x, padding_mask, self.group_size,
                                           type(self).__name__)  # Shapes: [G, S, D], [G, S]
      group_length = tokens.shape[1]
    else:  # each sequence's next T tokens: one group [B, T] of a group of group_length
      tokens = x
      valid = (jnp.ones(x.shape[:2], jnp.bool_) if padding_mask is None
               else padding_mask.astype(jnp.bool_))
      group_length = self.group_size or self.decode_length
    ids = self._group_ids(token_ids, x.shape[:2], valid.shape)  # Shape: [G, S] or None
    logits = self._router_logits(tokens, ids, deterministic)  # Shape: [G, S, E]
    router_scores = routing.router_scores(logits, self.score_function)  # Shape: [G, S, E]
    probs = routing.score_distribution(router_scores, self.score_function)  # Shape: [G, S, E]
    logits = logits.astype(jnp.float32)
    scores = self._routing_scores(router_scores, logits, deterministic)
    if self.decode_length is not None:  # Shape: [B, E]
      scores['slot_offset'] = self._decoded_slots(group_length, x.shape[0])
    weights = ExpertWeights(self.num_experts, self.ffn_dim, glu=self.glu, bias=self.expert_bias,
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
                                      sharded=mesh is not None, group_length=group_length)
    if mesh is not None:
      sharding.check_divisible(self.num_experts, tokens.shape[0], mesh)
      route_and_run = sharding.shard_map_layer(route_and_run, mesh, weights)
    out, decision = route_and_run(tokens, scores, valid, weights, draws, dropout_rng)
    if self.decode_length is not None:
      self._advance_decoding(scores['slot_offset'], decision, x.shape[1])
    out = out.reshape(x.shape)
    if self.num_shared_experts:
      shared_rng = self.make_rng('dropout') if use_dropout else None  # not any device's key
      out = out + self._shared_experts(x, valid, shared_rng)
    usage = self._sow(logits, probs, decision, valid)
    if self.balancing_bias:
      self._record_load(usage)
    return out

  def _group_ids(self, token_ids: jax.Array | None, batch_shape: tuple[int, int],
                 group_shape: tuple[int, int]) -> jax.Array | None:
    """token_ids [B, L] -> [G, S], as the tokens are grouped; None stays None."""
    if token_ids is None:
      return None
    if token_ids.shape != batch_shape:
      raise ValueError(f'MoeLayer token_ids must have shape [batch, length] = {batch_shape}; '
                       f'got {token_ids.shape}.')
    return token_ids.reshape(group_shape)

  def _router_logits(self, tokens: jax.Array, token_ids: jax.Array | None,
                     deterministic: bool) -> jax.Array:
    """Router logits [G, S, E] in `router_dtype` of tokens [G, S, D] (ids [G, S] for 'hash')."""
    if self.router == 'hash':
      if token_ids is None:
        raise ValueError("MoeLayer(router='hash') routes by token id: pass token_ids [batch, "
                         'length] to MoeLayer.__call__.')
      return routers.hash_logits(token_ids, self.num_experts)
    common = dict(init_scale=self.router_init_scale, jitter_noise=self.jitter_noise,
                  dtype=self.router_dtype, name='router')
    if self.router == 'cosine':
      router = routers.CosineRouterLogits(self.num_experts, dim=self.router_dim, **common)
    elif self.router == 'distance':
      router = routers.DistanceRouterLogits(self.num_experts, **common)
    else:  # 'linear', 'gumbel'
      router = routers.RouterLogits(self.num_experts, use_bias=self.router_bias, **common)
    return router(tokens, deterministic)

  def _routing_scores(self, probs: jax.Array, logits: jax.Array,
                      deterministic: bool) -> dict[str, jax.Array]:
    """What routing reads: 'probs' [G, S, E], the router scores (the weights; Gumbel's
    straight-through one-hot), with `balancing_bias` 'selection' = probs + bias (what ranks the
    experts), and with `softmax_after_top_k` the 'logits' the weights are the softmax of."""
    if self.router == 'gumbel':
      noise_rng = None if deterministic else self.make_rng('gating')
      return {'probs': routers.gumbel_straight_through(logits, self.gumbel_temperature,
                                                       noise_rng)}
    scores = {'probs': probs}
    if self.softmax_after_top_k:
      scores['logits'] = logits
    if self.balancing_bias:
      bias = self.variable(BIAS_COLLECTION, 'bias', jnp.zeros, (self.num_experts,), jnp.float32)
      scores['selection'] = probs + jax.lax.stop_gradient(bias.value)
    return scores

  def _decoded_slots(self, group_length: int, batch: int) -> jax.Array:
    """[B, E] slots of each expert that the tokens decoded before this call took in their group
    (zeros when this call starts a group). The 'cache' collection's 'index' (where the call's
    tokens start) and 'slots' ([B, E]) hold them."""
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    slots = self.variable('cache', 'slots', jnp.zeros, (batch, self.num_experts), jnp.int32)
    return jnp.where(index.value % group_length == 0, 0, slots.value)

  def _advance_decoding(self, slot_offset: jax.Array, decision: routing.RoutingDecision,
                        length: int) -> None:
    """The slots taken after this call (`slot_offset` [B, E] before it, plus this call's choices,
    dropped ones too: they took their slot), and the position `length` tokens on."""
    taken = jnp.sum(jax.nn.one_hot(decision.expert_index, self.num_experts, dtype=jnp.int32)
                    * decision.chosen[..., None], axis=(1, 2))  # Shape: [B, E]
    self.put_variable('cache', 'slots', slot_offset + taken)
    self.put_variable('cache', 'index', self.get_variable('cache', 'index') + length)

  def _route(self, scores: dict[str, jax.Array], valid: jax.Array, draws: jax.Array | None,
             deterministic: bool, group_length: int) -> routing.RoutingDecision:
    """The decision of groups of `group_length` tokens (capacity from it), for the tokens at
    hand: all of them, or when decoding the next few (`scores['slot_offset']`)."""
    probs = scores['probs']  # Shape: [G, S, E]
    capacity = self.capacity(group_length, deterministic)
    if self.routing == 'dense':
      decision = routing.dense_routing(probs, valid)
    elif self.routing == 'experts_choose':
      decision = routing.experts_choose_routing(probs, valid, capacity=capacity,
                                                causal=self.causal)
    else:
      decision = routing.top_k_routing(
          probs, valid, num_selected_experts=self.num_selected_experts, capacity=capacity,
          causal=self.causal, normalize_weights=self.normalize_weights,
          batch_prioritized=self.batch_prioritized, random_routing_draws=draws,
          selection_scores=self._selection_scores(scores), top_p=self.top_p,
          slot_offset=scores.get('slot_offset'), top_k_logits=scores.get('logits'))
    return decision.replace(weight=decision.weight * self.routed_scaling_factor)

  def _selection_scores(self, scores: dict[str, jax.Array]) -> jax.Array | None:
    """What ranks the experts [G, S, E]: the (bias-corrected) scores, limited to each token's
    best groups with `num_selected_groups`; None: the scores themselves."""
    selection = scores.get('selection')
    if self.num_selected_groups is None:
      return selection
    return routing.limit_to_groups(scores['probs'] if selection is None else selection,
                                   self.num_expert_groups, self.num_selected_groups,
                                   self.group_score, self.unselected_group_fill)

  def _route_and_run(self, tokens: jax.Array, scores: dict[str, jax.Array], valid: jax.Array,
                     weights: dict[str, jax.Array], draws: jax.Array | None,
                     dropout_rng: jax.Array | None, *, deterministic: bool,
                     sharded: bool, group_length: int,
                     ) -> tuple[jax.Array, routing.RoutingDecision]:
    """Route, dispatch, run the experts, combine: tokens [G, S, D] -> [G, S, D], and the decision.

    scores: 'probs' [G, S, E], what routing weights by (and ranks by, unless 'selection'
    [G, S, E] is given). A pure function of its arrays. With `sharded`, it runs on each device
    inside `jax.shard_map` on that device's groups, and the expert buffers travel to the devices
    that own their experts and back with two all-to-alls.
    """
    decision = self._route(scores, valid, draws, deterministic, group_length)
    if sharded:  # each 'model' shard sums a slice of F: the output bias is added on one
      weights = sharding.once_over_model(weights, 'bo')
    block_size = self.block_size or default_block_size(decision.expert_index.size,
                                                       self.num_experts)
    dispatcher = make_dispatcher(decision, self.dispatch_method(sharded, deterministic),
                                 self.dtype, tile=block_tile(block_size))
    if isinstance(dispatcher, GroupedDispatcher):
      out = self._run_grouped(tokens, dispatcher, weights, dropout_rng, sharded)
    elif isinstance(dispatcher, RowDispatcher):
      out = self._run_rows(tokens, dispatcher, weights, dropout_rng, block_size)
    else:
      out = self._run_buffers(tokens, dispatcher, weights, dropout_rng, sharded)
    return out, decision  # Shape: [G, S, D]

  def _run_buffers(self, tokens: jax.Array, dispatcher: BufferDispatcher,
                   weights: dict[str, jax.Array], dropout_rng: jax.Array | None,
                   sharded: bool) -> jax.Array:
    """tokens [G, S, D] -> [G, S, D] through [E, G, C, D] capacity buffers, exchanged between
    devices when `sharded`."""
    buffers = dispatcher.dispatch(tokens.astype(self.dtype))  # Shape: [E, G, C, D]
    if sharded:
      buffers = sharding.to_expert_devices(buffers)  # Shape: [E_local, n_expert * G, C, D]
      dropout_rng = sharding.device_rng(dropout_rng)
    expert_out = expert_ffn(einops.rearrange(buffers, 'e g c d -> e (g c) d'), weights,
                            activation=self.expert_activation, dtype=self.dtype,
                            dropout_rate=self.expert_dropout, dropout_rng=dropout_rng)
    expert_out = einops.rearrange(expert_out, 'e (g c) d -> e g c d', c=buffers.shape[2])
    if sharded:
      expert_out = sharding.from_expert_devices(expert_out)  # Shape: [E, G, C, D]
    return dispatcher.combine(expert_out)

  def _run_rows(self, tokens: jax.Array, dispatcher: RowDispatcher,
                weights: dict[str, jax.Array], dropout_rng: jax.Array | None,
                block_size: int) -> jax.Array:
    """tokens [G, S, D] -> [G, S, D] through expert blocks of the dispatched rows only."""
    rows = dispatcher.dispatch_rows(tokens.astype(self.dtype))  # Shape: [R, D]
    rows = block_expert_ffn(rows, dispatcher.first_row, dispatcher.row_count, weights,
                            block_size=block_size, tile=dispatcher.tile,
                            activation=self.expert_activation, dtype=self.dtype,
                            dropout_rate=self.expert_dropout, dropout_rng=dropout_rng,
                            max_expert_rows=dispatcher.max_group)
    return dispatcher.combine_rows(rows)

  def _run_grouped(self, tokens: jax.Array, dispatcher: GroupedDispatcher,
                   weights: dict[str, jax.Array], dropout_rng: jax.Array | None,
                   sharded: bool) -> jax.Array:
    """tokens [G, S, D] -> [G, S, D] through grouped matmuls over the dispatched rows, which
    travel to their experts' devices and back in ragged exchanges when `sharded`."""
    rows = dispatcher.dispatch_rows(tokens.astype(self.dtype))  # Shape: [R, D]
    expert_rows, group_sizes = rows, dispatcher.row_count  # Shapes: [R, D], [E]
    if sharded:
      num_local_experts = weights['wi'].shape[0]
      plan = exchange.plan_exchange(group_sizes, num_local_experts, max_send=min(
          rows.shape[0], num_local_experts * dispatcher.max_group))
      expert_rows = exchange.to_expert_devices(rows, plan)  # Shape: [n_expert * max_send, D]
      group_sizes = plan.group_sizes  # Shape: [E_local]
      dropout_rng = sharding.device_rng(dropout_rng)
    expert_out = grouped_expert_ffn(expert_rows, group_sizes, weights,
                                    activation=self.expert_activation, dtype=self.dtype,
                                    dropout_rate=self.expert_dropout, dropout_rng=dropout_rng)
    if sharded:
      expert_out = exchange.from_expert_devices(expert_out, plan, rows.shape[0])  # Shape: [R, D]
    return dispatcher.combine_rows(expert_out)

  def _shared_experts(self, x: jax.Array, valid: jax.Array,
                      dropout_rng: jax.Array | None) -> jax.Array:
    """Sum of the shared experts on every token: x [B, L, D] -> [B, L, D], zeros on padding."""
    model_dim = x.shape[-1]
    weights = ExpertWeights(self.num_shared_experts, self.ffn_dim, glu=self.glu,
                            bias=self.expert_bias, init_scale=self.init_scale,
                            param_dtype=self.param_dtype, name='shared_experts')(model_dim)
    tokens = jnp.broadcast_to(x.reshape(1, -1, model_dim),
                              (self.num_shared_experts, x.size // model_dim, model_dim))
    # Shape: [E_shared, B * L, D]
    out = expert_ffn(tokens, weights, activation=self.expert_activation, dtype=self.dtype,
                     dropout_rate=self.expert_dropout, dropout_rng=dropout_rng).sum(axis=0)
    if self.shared_expert_gate:  # Shape: [B * L, 1]
      gate = nn.Dense(1, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='shared_expert_gate')(x.reshape(-1, model_dim))
      out = out * jax.nn.sigmoid(gate)
    return jnp.where(valid.reshape(-1, 1), out, 0).astype(self.dtype).reshape(x.shape)

  def _sow(self, logits: jax.Array, probs: jax.Array, decision: routing.RoutingDecision,
           valid: jax.Array) -> jax.Array:
    """Sow the aux losses, the metrics and the decision; returns the layer's expert usage [E].
    The metrics are computed only where 'intermediates' is collected: under jit XLA would drop
    them anyway, but eagerly (an init, a plain apply) they cost dozens of small compiles."""
    token_weight = valid.sum(axis=1, dtype=jnp.float32)  # Shape: [G]
    usage = routing.expert_usage(decision)  # Shape: [G, E]
    expert_usage = token_weight @ usage / jnp.maximum(token_weight.sum(), 1.0)  # Shape: [E]
    if self.is_mutable_collection('intermediates'):
      metrics = {
          'load_balancing_loss': routing.load_balancing_loss(probs, decision, valid,
                                                             self.load_balancing_loss_scale),
          'router_z_loss': routing.router_z_loss(logits, valid),
          'fraction_dropped': routing.fraction_dropped(decision),
          'expert_usage': expert_usage,
          'router_confidence': routing.router_confidence(probs, decision, valid),
          # Largest |logit| of a real token: what the z-loss keeps small (ST-MoE). The hash
          # router has no logits (its -1e9 only make the softmax one-hot): 0.
          'router_max_logit': (jnp.zeros((), jnp.float32) if self.router == 'hash' else
                               jnp.max(jnp.where(valid[..., None], jnp.abs(logits), 0.0))),
      }
      for name, value in metrics.items():
        self.sow('intermediates', name, value)
    if not self.is_initializing():  # (init keeps 'intermediates' out of its variables, not this)
      self.sow(DECISIONS, 'decision', decision)
      self.sow(DECISIONS, 'router_probs', probs)
    return expert_usage

  def _record_load(self, usage: jax.Array):
    """With `balancing_bias`, keep this call's expert usage [E] for the bias update, when the
    collection is mutable (applied with the biases alone, an imported model, it records none)."""
    if not self.is_mutable_collection(BIAS_COLLECTION):
      return
    load = self.variable(BIAS_COLLECTION, 'load', jnp.zeros, (self.num_experts,), jnp.float32)
    if not self.is_initializing():
      load.value = usage
