"""Routers: router logits -> RoutingDecision (which expert, which slot, what weight), and aux losses.

Axis legend (DESIGN.md): G routing groups, S tokens per group, E experts, K choices per token,
C expert capacity per group, D model width.

Every function here computes in float32: routing decisions are made in full precision whatever the
activation dtype (Switch's "selective precision"). A decision is held in *token-side* form: for each
token, K (expert, slot, weight) choices. Tokens-choose routing has K = num_selected_experts;
experts-choose and dense routing have K = E (choice k of a token is "expert k").

Routers (token -> logits [G, S, E]): `RouterLogits` (linear, Switch), `CosineRouterLogits` (X-MoE),
`DistanceRouterLogits` (Gaussian kernel around learned centroids), `hash_logits` (fixed by token id,
Roller et al.); `gumbel_straight_through` turns logits into hard top-1 gating. `top_k_routing` also
takes top-p ("dynamic") choices and DeepSeek-V3's balancing bias (`balancing_bias_update`).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RoutingDecision:
  """Where each token goes. All arrays are [G, S, K].

  expert_index: int32, the expert of each choice.
  position: int32, the slot of each choice in its expert's buffer of the group; only meaningful
    where `dispatched` is true.
  weight: float32, the combine weight of each choice; exactly 0 where not dispatched.
  chosen: bool, the router picked this choice (padding never is); capacity not yet applied.
  dispatched: bool, chosen and within capacity: the token is copied into its expert's buffer.
  capacity: static int C, the slots per expert per group.
  num_experts: static int E.
  """
  expert_index: jax.Array
  position: jax.Array
  weight: jax.Array
  chosen: jax.Array
  dispatched: jax.Array
  capacity: int = struct.field(pytree_node=False)
  num_experts: int = struct.field(pytree_node=False)


def expert_capacity(tokens_per_group: int, num_experts: int, num_selected_experts: int,
                    capacity_factor: float, min_expert_capacity: int) -> int:
  """C = ceil(capacity_factor * S * K / E), at least `min_expert_capacity`, at most S.

  An expert never receives more than S tokens of a group (a token picks an expert at most once),
  so slots beyond S would only ever hold padding.
  """
  capacity = math.ceil(capacity_factor * tokens_per_group * num_selected_experts / num_experts)
  return min(max(capacity, min_expert_capacity), tokens_per_group)


ROUTERS = ('linear', 'cosine', 'distance', 'gumbel', 'hash')
HASH_PRIME = 2654435761  # Knuth's multiplicative-hash prime, ~2^32 / golden ratio


def jitter(module: nn.Module, tokens: jax.Array, jitter_noise: float,
           deterministic: bool) -> jax.Array:
  """float32 tokens [G, S, D], times U(1 - eps, 1 + eps) noise (rng stream `jitter`) in training."""
  tokens = tokens.astype(jnp.float32)
  if jitter_noise > 0 and not deterministic:
    tokens = tokens * jax.random.uniform(module.make_rng('jitter'), tokens.shape, jnp.float32,
                                         1.0 - jitter_noise, 1.0 + jitter_noise)
  return tokens


class RouterLogits(nn.Module):
  """Linear router in float32: tokens [G, S, D] -> logits [G, S, E].

  Attributes:
    num_experts: E.
    use_bias: add a learned bias [E].
    init_scale: scale of the truncated-normal fan-in init of the kernel [D, E] (Switch used 0.1).
    jitter_noise: multiply a float32 copy of the input by U(1 - eps, 1 + eps) (rng stream
      `jitter`) when not deterministic; 0 disables it.
  """
  num_experts: int
  use_bias: bool = False
  init_scale: float = 1.0
  jitter_noise: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool) -> jax.Array:
    tokens = jitter(self, tokens, self.jitter_noise, deterministic)  # Shape: [G, S, D]
    dense = float32_dense(self.num_experts, self.init_scale, self.use_bias, 'dense')
    return dense(tokens)  # Shape: [G, S, E], float32


def float32_dense(features: int, init_scale: float, use_bias: bool, name: str) -> nn.Dense:
  """A float32 router projection [D] -> [features]: truncated-normal fan-in kernel [D, features]
  (logical axes ('embed', None)), optional zero bias."""
  kernel_init = nn.initializers.variance_scaling(init_scale, 'fan_in', 'truncated_normal')
  return nn.Dense(features, use_bias=use_bias, dtype=jnp.float32, param_dtype=jnp.float32,
                  name=name, kernel_init=nn.with_logical_partitioning(kernel_init, ('embed', None)),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


def l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  """x / ||x|| along `axis` (the norm floored at 1e-6, so |result| <= 1 always)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-12)


class CosineRouterLogits(nn.Module):
  """X-MoE's cosine router in float32: tokens [G, S, D] -> logits [G, S, E] = cos(W x, e_i) / tau.

  Tokens are projected to `dim` (X-MoE: 16) by W [D, dim]; the projected tokens and the expert
  embeddings [dim, E] are L2-normalized, so |logits| <= 1 / tau, tau = exp(log_temperature) a
  learned scalar (init `init_temperature`, X-MoE's 0.07).

  Attributes:
    num_experts: E.
    dim: the routing dimension.
    init_scale: truncated-normal fan-in init scale of W and of the expert embeddings.
    jitter_noise: as in `RouterLogits`.
    init_temperature: tau at init.
  """
  num_experts: int
  dim: int = 16
  init_scale: float = 1.0
  jitter_noise: float = 0.0
  init_temperature: float = 0.07

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool) -> jax.Array:
    tokens = jitter(self, tokens, self.jitter_noise, deterministic)  # Shape: [G, S, D]
    projected = float32_dense(self.dim, self.init_scale, False, 'projection')(tokens)
    # Shape: [G, S, dim]
    init = nn.initializers.variance_scaling(self.init_scale, 'fan_in', 'truncated_normal')
    embeddings = self.param('expert_embeddings', nn.with_logical_partitioning(init, (None, None)),
                            (self.dim, self.num_experts), jnp.float32)  # Shape: [dim, E]
    log_temperature = self.param(
        'log_temperature', nn.with_logical_partitioning(
            nn.initializers.constant(math.log(self.init_temperature)), ()), (), jnp.float32)
    cosine = jnp.einsum('gsr,re->gse', l2_normalize(projected, -1),
                        l2_normalize(embeddings, 0))  # Shape: [G, S, E], in [-1, 1]
    return cosine / jnp.exp(log_temperature)


class DistanceRouterLogits(nn.Module):
  """Gaussian-kernel router in float32: logits [G, S, E] = -||x - c_e||^2 / (2 sigma^2).

  c_e [E, D] are learned centroids (normal, variance `init_scale`: the scale of normalized
  tokens), sigma = exp(log_sigma) a learned bandwidth (init sqrt(D), so logit gaps start
  small). softmax(logits) is the normalized kernel: the closest centroid gets the most weight.

  Attributes:
    num_experts: E.
    init_scale: variance of the centroids at init.
    jitter_noise: as in `RouterLogits`.
  """
  num_experts: int
  init_scale: float = 1.0
  jitter_noise: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool) -> jax.Array:
    tokens = jitter(self, tokens, self.jitter_noise, deterministic)  # Shape: [G, S, D]
    model_dim = tokens.shape[-1]
    init = nn.initializers.normal(math.sqrt(self.init_scale))
    centroids = self.param('centroids', nn.with_logical_partitioning(init, (None, 'embed')),
                           (self.num_experts, model_dim), jnp.float32)  # Shape: [E, D]
    log_sigma = self.param('log_sigma', nn.with_logical_partitioning(
        nn.initializers.constant(0.5 * math.log(model_dim)), ()), (), jnp.float32)
    squared_distance = (jnp.sum(tokens**2, -1, keepdims=True)
                        - 2 * jnp.einsum('gsd,ed->gse', tokens, centroids)
                        + jnp.sum(centroids**2, -1))  # Shape: [G, S, E]
    return -jnp.maximum(squared_distance, 0.0) / (2 * jnp.exp(2 * log_sigma))


def hash_logits(token_ids: jax.Array, num_experts: int) -> jax.Array:
  """Hash routing (Roller et al.): token ids [G, S] -> logits [G, S, E], 0 at the expert
  (id * HASH_PRIME) % E (uint32 arithmetic) and -1e9 elsewhere, so the softmax is exactly one-hot.

  Fixed, not learned, and independent of the token vector: a token id always goes to one expert.
  """
  expert = (token_ids.astype(jnp.uint32) * jnp.uint32(HASH_PRIME)) % jnp.uint32(num_experts)
  hot = jax.nn.one_hot(expert.astype(jnp.int32), num_experts, dtype=jnp.bool_)  # [G, S, E]
  return jnp.where(hot, 0.0, -1e9).astype(jnp.float32)


def gumbel_straight_through(logits: jax.Array, temperature: float,
                            noise_rng: jax.Array | None) -> jax.Array:
  """Hard Gumbel-softmax gating [G, S, E] from logits [G, S, E] (float32).

  Forward: the one-hot of argmax(logits + g), g ~ Gumbel(0, 1) drawn from `noise_rng` (None: no
  noise, evaluation). Backward: the gradient of softmax((logits + g) / temperature) (the
  straight-through estimator). Routed top-1, the chosen expert's combine weight is 1.
  """
  logits = logits.astype(jnp.float32)
  if noise_rng is not None:
    logits = logits + jax.random.gumbel(noise_rng, logits.shape, jnp.float32)
  soft = jax.nn.softmax(logits / temperature, axis=-1)  # Shape: [G, S, E]
  hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return hard + soft - jax.lax.stop_gradient(soft)


def top_p_mask(top_probs: jax.Array, top_p: float) -> jax.Array:
  """Top-p ("dynamic") routing: bool [G, S, K], the fewest of a token's K choices, most probable
  first (`top_probs` [G, S, K] sorted descending), whose probabilities sum to >= top_p.

  Choice k is kept while the choices before it sum to less than top_p (1e-6 slack for rounding),
  so the first is always kept and K caps the number.
  """
  before = jnp.cumsum(top_probs, axis=-1) - top_probs  # Shape: [G, S, K]
  return before + 1e-6 < top_p


def balancing_bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 auxiliary-loss-free balancing: bias_e + rate * sign(mean_e' load - load_e).

  bias, load: [..., E] (load: each expert's share of the token choices, or counts). Under-used
  experts gain score, over-used ones lose it. Applied outside the gradient, after each step.
  """
  return bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def _slot_positions(choice_mask: jax.Array) -> jax.Array:
  """Slot of each choice in its expert's buffer, choices taken in the order of axis 1.

  choice_mask: [G, N, E] one-hot rows (all-zero rows for choices that are not made).
  Returns [G, N] int32: how many earlier choices of the group went to the same expert.
  """
  earlier = jnp.cumsum(choice_mask, axis=1) - choice_mask  # Shape: [G, N, E]
  return jnp.sum(earlier * choice_mask, axis=-1).astype(jnp.int32)


def top_k_routing(probs: jax.Array, valid: jax.Array, *, num_selected_experts: int,
                  capacity: int, causal: bool, normalize_weights: bool = False,
                  batch_prioritized: bool = False,
                  random_routing_draws: jax.Array | None = None,
                  selection_scores: jax.Array | None = None,
                  top_p: float | None = None) -> RoutingDecision:
  """Tokens choose their top-k experts (k=1 Switch, k=2 GShard), then capacity drops overflow.

  probs: [G, S, E] float32 router probabilities; valid: [G, S] bool, false on padding.

  Overflow order. With `causal=False` (GShard/Switch), all first choices of a group claim slots
  before any second choice, each in sequence order. That lets a token's k-th choice (k >= 2) be
  dropped because of a later token's first choice, so with `causal=True` choices claim slots
  token by token (all K choices of token s before those of token s+1): a token's routing then
  depends only on itself and earlier tokens. For k=1 the two orders are the same.

  batch_prioritized: tokens claim slots in order of their top-1 probability instead of sequence
    order (Riquelme et al.). It looks at later tokens: encoders only.
  normalize_weights: rescale each token's k weights to sum to 1 (off in Switch).
  random_routing_draws: [G, S, K] uniform [0, 1) draws for GShard random routing: the j-th
    choice (j >= 2) is kept when its draw is below K * w_j, w the top-k weights normalized to sum
    1 (probability min(1, 2 * w_2) for K=2; always kept at uniform probabilities). None keeps
    every choice.
  selection_scores: [G, S, E] float32 that rank the experts instead of `probs` (DeepSeek-V3:
    probs plus a balancing bias); the weights still come from `probs`. None ranks by `probs`.
  top_p: keep only the fewest choices whose probabilities reach top_p (`top_p_mask`), K at most;
    the others are not `chosen`. With `normalize_weights`, weights are normalized over the kept
    choices.
  """
  num_groups, group_size, num_experts = probs.shape
  if batch_prioritized and causal:
    raise ValueError('batch-prioritized routing orders tokens by confidence, looking at later '
                     'tokens; it is for encoders only (causal=False).')
  if selection_scores is None:
    top_probs, expert_index = jax.lax.top_k(probs, num_selected_experts)  # Shape: [G, S, K]
  else:
    _, expert_index = jax.lax.top_k(selection_scores, num_selected_experts)  # Shape: [G, S, K]
    top_probs = jnp.take_along_axis(probs, expert_index, axis=-1)
  chosen = jnp.broadcast_to(valid[..., None], expert_index.shape)  # Shape: [G, S, K]
  kept_probs = top_probs
  if top_p is not None:
    kept = top_p_mask(top_probs, top_p)  # Shape: [G, S, K], the first choice always kept
    chosen = chosen & kept
    kept_probs = jnp.where(kept, top_probs, 0.0)
  normalized = kept_probs / jnp.sum(kept_probs, axis=-1, keepdims=True)
  weight = normalized if normalize_weights else top_probs
  if random_routing_draws is not None and num_selected_experts > 1:
    keep_probability = jnp.minimum(1.0, num_selected_experts * normalized)
    keep_probability = keep_probability.at[..., 0].set(1.0)
    chosen = chosen & (random_routing_draws < keep_probability)

  choice_mask = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * chosen[..., None]
  # Shape: [G, S, K, E]
  if batch_prioritized:
    order = jnp.argsort(-top_probs[..., 0], axis=-1)  # Shape: [G, S], most confident first
    choice_mask = jnp.take_along_axis(choice_mask, order[..., None, None], axis=1)
  if causal:  # token-major: s outer, k inner
    position = _slot_positions(choice_mask.reshape(num_groups, -1, num_experts))
    position = position.reshape(num_groups, group_size, num_selected_experts)
  else:  # choice-major: k outer, s inner
    position = _slot_positions(
        choice_mask.transpose(0, 2, 1, 3).reshape(num_groups, -1, num_experts))
    position = position.reshape(num_groups, num_selected_experts, group_size).transpose(0, 2, 1)
  if batch_prioritized:
    inverse = jnp.argsort(order, axis=-1)
    position = jnp.take_along_axis(position, inverse[..., None], axis=1)

  dispatched = chosen & (position < capacity)
  return RoutingDecision(expert_index=expert_index.astype(jnp.int32), position=position,
                         weight=jnp.where(dispatched, weight, 0.0), chosen=chosen,
                         dispatched=dispatched, capacity=capacity, num_experts=num_experts)


def experts_choose_routing(probs: jax.Array, valid: jax.Array, *, capacity: int,
                           causal: bool) -> RoutingDecision:
  """Each expert takes the C tokens of the group with the highest probability for it (Zhou et al.).

  Every expert fills all C slots (unless the group has fewer than C real tokens); a token may be
  taken by several experts or by none. An expert ranks every token of the group, later ones
  included: encoders only.

  probs: [G, S, E] float32; valid: [G, S] bool. The decision has K = E: choice e of a token is
  expert e, ordered as the expert ranked its tokens.
  """
  if causal:
    raise ValueError('experts-choose routing ranks all tokens of a group, later ones included; '
                     'it is for encoders only (causal=False).')
  num_groups, group_size, num_experts = probs.shape
  ranked = jnp.where(valid[..., None], probs, -1.0).transpose(0, 2, 1)  # Shape: [G, E, S]
  _, token_index = jax.lax.top_k(ranked, capacity)  # Shape: [G, E, C]
  group = jnp.arange(num_groups)[:, None, None]
  expert = jnp.arange(num_experts)[None, :, None]
  slot = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), token_index.shape)
  position = jnp.full(probs.shape, capacity, jnp.int32).at[group, token_index, expert].set(slot)
  # Shape: [G, S, E]
  chosen = (position < capacity) & valid[..., None]
  expert_index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), probs.shape)
  return RoutingDecision(expert_index=expert_index, position=position,
                         weight=jnp.where(chosen, probs, 0.0), chosen=chosen, dispatched=chosen,
                         capacity=capacity, num_experts=num_experts)


def dense_routing(probs: jax.Array, valid: jax.Array) -> RoutingDecision:
  """Every token goes to every expert, weighted by its router probability; no capacity (C = S).

  probs: [G, S, E] float32; valid: [G, S] bool. K = E, and token s sits in slot s of each expert.
  """
  _, group_size, num_experts = probs.shape
  chosen = jnp.broadcast_to(valid[..., None], probs.shape)  # Shape: [G, S, E]
  expert_index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), probs.shape)
  position = jnp.broadcast_to(jnp.arange(group_size, dtype=jnp.int32)[:, None], probs.shape)
  return RoutingDecision(expert_index=expert_index, position=position,
                         weight=jnp.where(chosen, probs, 0.0), chosen=chosen, dispatched=chosen,
                         capacity=group_size, num_experts=num_experts)


def expert_usage(decision: RoutingDecision) -> jax.Array:
  """Fraction of the chosen token choices of each group that went to each expert: [G, E].

  Counted before capacity drops any; a group with no choice (all padding) gives zeros.
  """
  counts = jnp.sum(jax.nn.one_hot(decision.expert_index, decision.num_experts)
                   * decision.chosen[..., None], axis=(1, 2))  # Shape: [G, E]
  return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def _token_weights(valid: jax.Array) -> jax.Array:
  """Weight of each token in a layer-wide mean over valid tokens: [G, S] summing to 1."""
  valid = valid.astype(jnp.float32)
  return valid / jnp.maximum(jnp.sum(valid), 1.0)


def load_balancing_loss(probs: jax.Array, decision: RoutingDecision,
                        valid: jax.Array) -> jax.Array:
  """Switch Transformer eq. 4 without its coefficient: E * sum_i f_i * P_i, per group.

  f_i: fraction of the group's token choices that went to expert i (before capacity drops);
  P_i: mean router probability of expert i over the group's valid tokens. Groups are weighted by
  their number of valid tokens (equally when nothing is padded). Equals 1.0 under uniform routing
  for every K. probs: [G, S, E] float32; valid: [G, S] bool. Returns a float32 scalar.
  """
  num_experts = probs.shape[-1]
  valid_f = valid.astype(jnp.float32)
  tokens_per_group = jnp.sum(valid_f, axis=1)  # Shape: [G]
  mean_probs = (jnp.sum(probs * valid_f[..., None], axis=1)
                / jnp.maximum(tokens_per_group, 1.0)[:, None])  # Shape: [G, E]
  per_group = num_experts * jnp.sum(expert_usage(decision) * mean_probs, axis=-1)  # Shape: [G]
  return jnp.sum(per_group * tokens_per_group) / jnp.maximum(jnp.sum(tokens_per_group), 1.0)


def router_z_loss(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over valid tokens of logsumexp(logits)^2. logits: [G, S, E]."""
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # Shape: [G, S]
  return jnp.sum(log_z**2 * _token_weights(valid))


def fraction_dropped(decision: RoutingDecision) -> jax.Array:
  """Fraction of the chosen token choices that capacity dropped (float32 scalar)."""
  chosen = jnp.sum(decision.chosen)
  return 1.0 - jnp.sum(decision.dispatched) / jnp.maximum(chosen, 1)


def router_confidence(probs: jax.Array, decision: RoutingDecision, valid: jax.Array) -> jax.Array:
  """Mean over valid tokens of the router probability given to the chosen experts.

  For top-1 routing it is the mean top-1 probability. Uses the full router probabilities, not the
  (possibly normalized) combine weights. probs: [G, S, E].
  """
  chosen_probs = jnp.take_along_axis(probs, decision.expert_index, axis=-1)  # Shape: [G, S, K]
  per_token = jnp.sum(jnp.where(decision.chosen, chosen_probs, 0.0), axis=-1)  # Shape: [G, S]
  return jnp.sum(per_token * _token_weights(valid))
