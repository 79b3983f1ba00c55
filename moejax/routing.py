"""Routing decisions: router probabilities -> RoutingDecision (which expert, which slot, what
weight), and the aux losses and statistics of a decision. Pure functions of arrays, no parameters
(the routers that score tokens are `moejax.routers`).

Axis legend (DESIGN.md): B batch, L length, G routing groups, S tokens per group, E experts,
K choices per token, C expert capacity per group, D model width.

Everything here computes in float32. A decision is held in *token-side* form: for each token, K
(expert, slot, weight) choices. Tokens-choose routing has K = num_selected_experts; experts-choose
and dense routing have K = E (choice k of a token is "expert k").

- `group_tokens`: x [B, L, D] -> routing groups [G, S, D].
- `router_scores`: logits -> what experts are chosen and weighted by: softmax (Switch) or sigmoid
  (DeepSeek-V3, arXiv:2412.19437; GLM-4.5); `score_distribution`, what the aux losses read.
- `limit_to_groups`: group-limited top-k (DeepSeek-V2, arXiv:2405.04434; DeepSeek-V3).
- `top_k_routing`: tokens choose experts (Switch top-1, arXiv:2101.03961; GShard top-2,
  arXiv:2006.16668), with top-p ("dynamic") choices, batch-prioritized order (V-MoE,
  arXiv:2106.05974), random routing (GShard) and selection scores (DeepSeek-V3's balancing bias,
  arXiv:2412.19437).
- `experts_choose_routing` (Zhou et al., arXiv:2202.09368), `dense_routing`.
- `load_balancing_loss` (Switch eq. 4), `router_z_loss` (ST-MoE eq. 5, arXiv:2202.08906), and the
  statistics the layer reports: `expert_usage`, `fraction_dropped`, `router_confidence`.
"""
from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
from flax import struct

from moejax.errors import ConfigError

ROUTING_METHODS = ('tokens_choose', 'experts_choose', 'dense')
LOAD_BALANCING_SCALES = ('per_choice', 'per_token')
SCORE_FUNCTIONS = ('softmax', 'sigmoid')
GROUP_SCORES = ('max', 'top2_sum')
# What the experts of an unselected group score before the top-k: transformers 4.57.6 (DeepSeek-V2,
# -V3, GLM-4.5) masks them with 0, DeepSeek's released inference code (inference/model.py,
# Gate.forward) with -inf; they differ when bias-corrected scores are negative.
UNSELECTED_GROUP_FILLS = {'zero': 0.0, 'neg_inf': -jnp.inf}


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


def group_tokens(x: jax.Array, padding_mask: jax.Array | None, group_size: int | None,
                 owner: str = 'MoeLayer') -> tuple[jax.Array, jax.Array]:
  """x [B, L, D] -> tokens [G, S, D] and valid [G, S] (bool); S = group_size, or L when None.

  Groups are consecutive runs of the B * L tokens in batch-major order, so a group may span the end
  of one sequence and the start of the next when S does not divide L.
  """
  if x.ndim != 3:
    raise ValueError(f'{owner} input must have rank 3 [batch, length, model_dim]; '
                     f'got shape {x.shape}.')
  batch, length, _ = x.shape
  if padding_mask is None:
    padding_mask = jnp.ones((batch, length), jnp.bool_)
  elif padding_mask.shape != (batch, length):
    raise ValueError(f'{owner} padding_mask must have shape [batch, length] = '
                     f'{(batch, length)} (True for real tokens); got {padding_mask.shape}.')
  size = length if group_size is None else group_size
  num_tokens = batch * length
  if num_tokens % size:
    raise ConfigError('group_size', group_size,
                      f'it must divide the batch * length = {batch} * {length} = {num_tokens} '
                      f'tokens (pad the batch, or pick a divisor)', owner)
  tokens = einops.rearrange(x, 'b l d -> (b l) d')  # Shape: [B * L, D]
  tokens = einops.rearrange(tokens, '(g s) d -> g s d', s=size)  # Shape: [G, S, D]
  valid = einops.rearrange(padding_mask, 'b l -> (b l)')
  return tokens, einops.rearrange(valid, '(g s) -> g s', s=size).astype(jnp.bool_)


def expert_capacity(tokens_per_group: int, num_experts: int, num_selected_experts: int,
                    capacity_factor: float, min_expert_capacity: int) -> int:
  """C = ceil(capacity_factor * S * K / E), at least `min_expert_capacity`, at most S.

  An expert never receives more than S tokens of a group (a token picks an expert at most once),
  so slots beyond S would only ever hold padding.
  """
  capacity = math.ceil(capacity_factor * tokens_per_group * num_selected_experts / num_experts)
  return min(max(capacity, min_expert_capacity), tokens_per_group)


def router_scores(logits: jax.Array, score_function: str) -> jax.Array:
  """Router logits [G, S, E] -> scores [G, S, E] float32, computed in the logits' dtype: a
  'softmax' over the experts (Switch), or each expert's own 'sigmoid' (DeepSeek-V3, GLM-4.5)."""
  if score_function == 'sigmoid':
    return jax.nn.sigmoid(logits).astype(jnp.float32)
  return jax.nn.softmax(logits, axis=-1).astype(jnp.float32)


def score_distribution(scores: jax.Array, score_function: str) -> jax.Array:
  """Scores [G, S, E] -> a distribution over the experts [G, S, E], what the load-balancing loss,
  the router confidence and the sown router probabilities read: softmax scores as they are,
  sigmoid scores divided by their sum over the experts (as DeepSeek-V3's sequence-wise balance
  loss normalizes them, arXiv:2412.19437 eq. 19), so the loss is 1 at uniform routing for both.
  The sum gets + 1e-20, as the weights' (scores that all round to 0 give 0, not NaN)."""
  if score_function == 'sigmoid':
    return scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)
  return scores


def limit_to_groups(scores: jax.Array, num_groups: int, num_selected_groups: int,
                    group_score: str, fill: str) -> jax.Array:
  """Group-limited top-k: scores [G, S, E] with the experts outside each token's
  `num_selected_groups` best groups set to UNSELECTED_GROUP_FILLS[fill]; the top-k then ranks
  these. The E experts form `num_groups` groups of consecutive indices; a group scores its
  best expert's score ('max': DeepSeek-V2's group_limited_greedy) or the sum of its two best
  ('top2_sum': DeepSeek-V3's and GLM-4.5's noaux_tc, on the bias-corrected scores).

  Worked example, one token, E = 4 in 2 groups, one kept, 'top2_sum': scores [-0.1, -0.2,
  -0.5, -0.6] give group scores [-0.3, -1.1], so group 0 is kept; 'zero' masks to [-0.1,
  -0.2, 0, 0] and top-2 takes experts 2 and 3 of the masked group; 'neg_inf' takes 0 and 1.
  """
  num_tokens_groups, group_size, num_experts = scores.shape
  grouped = scores.reshape(num_tokens_groups, group_size, num_groups, num_experts // num_groups)
  # Shape: [G, S, n_groups, E / n_groups]
  if group_score == 'max':
    per_group = jnp.max(grouped, axis=-1)  # Shape: [G, S, n_groups]
  else:
    per_group = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # Shape: [G, S, n_groups]
  _, kept_groups = jax.lax.top_k(per_group, num_selected_groups)  # Shape: [G, S, n_kept]
  kept = jnp.any(jax.nn.one_hot(kept_groups, num_groups, dtype=jnp.bool_), axis=-2)
  # Shape: [G, S, n_groups]
  masked = jnp.where(kept[..., None], grouped, UNSELECTED_GROUP_FILLS[fill])
  return masked.reshape(scores.shape)


def top_p_mask(top_probs: jax.Array, top_p: float) -> jax.Array:
  """Top-p ("dynamic") routing: bool [G, S, K], the fewest of a token's K choices, most probable
  first (`top_probs` [G, S, K] sorted descending), whose probabilities sum to >= top_p.

  Choice k is kept while the choices before it sum to less than top_p (1e-6 slack for rounding),
  so the first is always kept and K caps the number.
  """
  before = jnp.cumsum(top_probs, axis=-1) - top_probs  # Shape: [G, S, K]
  return before + 1e-6 < top_p


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
                  top_p: float | None = None,
                  slot_offset: jax.Array | None = None,
                  top_k_logits: jax.Array | None = None) -> RoutingDecision:
  """Tokens choose their top-k experts (k=1 Switch, k=2 GShard), then capacity drops overflow.

  probs: [G, S, E] float32 router scores (softmax probabilities, or sigmoid scores); valid:
  [G, S] bool, false on padding.

  Overflow order. With `causal=False` (GShard/Switch), all first choices of a group claim slots
  before any second choice, each in sequence order. That lets a token's k-th choice (k >= 2) be
  dropped because of a later token's first choice, so with `causal=True` choices claim slots
  token by token (all K choices of token s before those of token s+1): a token's routing then
  depends only on itself and earlier tokens. For k=1 the two orders are the same.

  batch_prioritized: tokens claim slots in order of their top-1 probability instead of sequence
    order (Riquelme et al.). It looks at later tokens: encoders only.
  normalize_weights: rescale each token's k weights to sum to 1 (off in Switch); the sum gets
    DeepSeek-V3's + 1e-20 (for sigmoid scores all near 0; below half a float32 ulp of any sum of
    top-k softmax probabilities, >= 1 / E, so exact there).
  random_routing_draws: [G, S, K] uniform [0, 1) draws for GShard random routing: the j-th
    choice (j >= 2) is kept when its draw is below K * w_j, w the top-k weights normalized to sum
    1 (probability min(1, 2 * w_2) for K=2; always kept at uniform probabilities). None keeps
    every choice.
  selection_scores: [G, S, E] float32 that rank the experts instead of `probs` (DeepSeek-V3:
    probs plus a balancing bias); the weights still come from `probs`. None ranks by `probs`.
  top_p: keep only the fewest choices whose probabilities reach top_p (`top_p_mask`), K at most;
    the others are not `chosen`. With `normalize_weights`, weights are normalized over the kept
    choices.
  slot_offset: [G, E] int32, the slots of each expert's buffer that earlier tokens of the group
    claimed already (decoding a group a few tokens at a time: `MoeLayer.decode_length`); causal
    routing only. None: the group starts here.
  top_k_logits: [G, S, E] float32 router logits: the weights are the softmax of the chosen
    experts' logits (gpt-oss's softmax after the top-k; equal to softmax probabilities with
    `normalize_weights`). None: the weights come from `probs`.
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
  if top_k_logits is None:
    normalized = kept_probs / (jnp.sum(kept_probs, axis=-1, keepdims=True) + 1e-20)
  else:  # Shape: [G, S, K]
    normalized = jax.nn.softmax(jnp.take_along_axis(top_k_logits, expert_index, axis=-1), -1)
  weight = normalized if normalize_weights or top_k_logits is not None else top_probs
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
  if slot_offset is not None:
    if not causal:
      raise ValueError('slot_offset continues a group token by token: causal routing only.')
    position = position + jnp.take_along_axis(slot_offset[:, None, :], expert_index, axis=-1)

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


def load_balancing_loss(probs: jax.Array, decision: RoutingDecision, valid: jax.Array,
                        scale: str = 'per_choice') -> jax.Array:
  """Switch Transformer eq. 4 without its coefficient: E * sum_i f_i * P_i, per group.

  P_i: mean router probability of expert i over the group's valid tokens. f_i: how much of the
  group's routing went to expert i (chosen choices, before capacity drops any), by `scale`:
    'per_choice' (moejax's default): the fraction of the group's token *choices*, so sum_i f_i = 1
      and the loss is 1.0 under uniform routing for every K;
    'per_token' (GShard, flaxformer, ST-MoE's top-K): the number of choices per valid *token*, so
      sum_i f_i = K and the loss is K under uniform routing, K times 'per_choice' when every token
      makes all K choices. A coefficient from those papers ports as is with this scale.
  For K = 1 the two are equal. Groups are weighted by their number of valid tokens (equally when
  nothing is padded). probs: [G, S, E] float32; valid: [G, S] bool. Returns a float32 scalar.
  """
  if scale not in LOAD_BALANCING_SCALES:
    raise ConfigError('load_balancing_loss_scale', scale,
                      f'it must be one of {LOAD_BALANCING_SCALES}', 'load_balancing_loss')
  num_experts = probs.shape[-1]
  valid_f = valid.astype(jnp.float32)
  tokens_per_group = jnp.sum(valid_f, axis=1)  # Shape: [G]
  mean_probs = (jnp.sum(probs * valid_f[..., None], axis=1)
                / jnp.maximum(tokens_per_group, 1.0)[:, None])  # Shape: [G, E]
  routed = expert_usage(decision)  # Shape: [G, E], per choice
  if scale == 'per_token':
    choices = jnp.sum(decision.chosen, axis=(1, 2), dtype=jnp.float32)  # Shape: [G]
    routed = routed * (choices / jnp.maximum(tokens_per_group, 1.0))[:, None]
  per_group = num_experts * jnp.sum(routed * mean_probs, axis=-1)  # Shape: [G]
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
