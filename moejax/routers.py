"""Routers: how tokens are scored, tokens [G, S, D] -> router logits [G, S, E].

Axis legend (DESIGN.md): G routing groups, S tokens per group, D model width, E experts.

These are the only routing parts with parameters. What is done with the scores (top-K choices,
capacity, aux losses) is `moejax.routing`, pure functions of arrays. Every router computes in
`dtype`, float32 by default whatever the activation dtype (Switch's "selective precision",
arXiv:2101.03961 section 2.4); a bfloat16 router is there to reproduce that ablation.

- `RouterLogits`: linear, logits = x W (Switch, arXiv:2101.03961).
- `CosineRouterLogits`: X-MoE's cosine of a low-dimensional projection and expert embeddings over a
  learned temperature (arXiv:2204.09179).
- `DistanceRouterLogits`: a Gaussian kernel of the distance to learned expert centroids.
- `hash_logits`: a fixed expert per token id (Roller et al., arXiv:2106.04426).
- `gumbel_straight_through`: hard Gumbel-softmax top-1 gating from any logits (arXiv:1611.01144).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ROUTERS = ('linear', 'cosine', 'distance', 'gumbel', 'hash')
HASH_PRIME = 2654435761  # Knuth's multiplicative-hash prime, ~2^32 / golden ratio


def jitter(module: nn.Module, tokens: jax.Array, jitter_noise: float, deterministic: bool,
           dtype: Any = jnp.float32) -> jax.Array:
  """Tokens [G, S, D] in `dtype`, times U(1 - eps, 1 + eps) noise (rng stream `jitter`) in
  training."""
  tokens = tokens.astype(dtype)
  if jitter_noise > 0 and not deterministic:
    tokens = tokens * jax.random.uniform(module.make_rng('jitter'), tokens.shape, jnp.float32,
                                         1.0 - jitter_noise, 1.0 + jitter_noise).astype(dtype)
  return tokens


def router_dense(features: int, init_scale: float, use_bias: bool, name: str,
                 dtype: Any = jnp.float32) -> nn.Dense:
  """A router projection [D] -> [features] computed in `dtype`: float32 truncated-normal fan-in
  kernel [D, features], optional zero bias [features]."""
  kernel_init = nn.initializers.variance_scaling(init_scale, 'fan_in', 'truncated_normal')
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=kernel_init)


def l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  """x / ||x|| along `axis` (the norm floored at 1e-6, so |result| <= 1 always)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + 1e-12)


class RouterLogits(nn.Module):
  """Linear router: tokens [G, S, D] -> logits [G, S, E] (Switch).

  Attributes:
    num_experts: E.
    use_bias: add a learned bias [E].
    init_scale: scale of the truncated-normal fan-in init of the kernel [D, E] (Switch used 0.1).
    jitter_noise: multiply the input by U(1 - eps, 1 + eps) (rng stream `jitter`) when not
      deterministic; 0 disables it.
    dtype: compute dtype (params are float32).
  """
  num_experts: int
  use_bias: bool = False
  init_scale: float = 1.0
  jitter_noise: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool) -> jax.Array:
    tokens = jitter(self, tokens, self.jitter_noise, deterministic, self.dtype)  # [G, S, D]
    dense = router_dense(self.num_experts, self.init_scale, self.use_bias, 'dense', self.dtype)
    return dense(tokens)  # Shape: [G, S, E]


class CosineRouterLogits(nn.Module):
  """X-MoE's cosine router: tokens [G, S, D] -> logits [G, S, E] = cos(W x, e_i) / tau.

  Tokens are projected to `dim` (X-MoE: 16) by W [D, dim]; the projected tokens and the expert
  embeddings [dim, E] are L2-normalized, so |logits| <= 1 / tau, tau = exp(log_temperature) a
  learned scalar (init `init_temperature`, X-MoE's 0.07).

  Attributes:
    num_experts: E.
    dim: the routing dimension.
    init_scale: truncated-normal fan-in init scale of W and of the expert embeddings.
    jitter_noise, dtype: as in `RouterLogits`.
    init_temperature: tau at init.
  """
  num_experts: int
  dim: int = 16
  init_scale: float = 1.0
  jitter_noise: float = 0.0
  init_temperature: float = 0.07
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool) -> jax.Array:
    tokens = jitter(self, tokens, self.jitter_noise, deterministic, self.dtype)  # [G, S, D]
    projected = router_dense(self.dim, self.init_scale, False, 'projection', self.dtype)(tokens)
    # Shape: [G, S, dim]
    init = nn.initializers.variance_scaling(self.init_scale, 'fan_in', 'truncated_normal')
    embeddings = self.param('expert_embeddings', init, (self.dim, self.num_experts),
                            jnp.float32)  # Shape: [dim, E]
    log_temperature = self.param('log_temperature',
                                 nn.initializers.constant(math.log(self.init_temperature)), (),
                                 jnp.float32)
    cosine = jnp.einsum('gsr,re->gse', l2_normalize(projected, -1),
                        l2_normalize(embeddings.astype(self.dtype), 0))  # [G, S, E], in [-1, 1]
    return cosine / jnp.exp(log_temperature).astype(self.dtype)


class DistanceRouterLogits(nn.Module):
  """Gaussian-kernel router: logits [G, S, E] = -||x - c_e||^2 / (2 sigma^2).

  c_e [E, D] are learned centroids (normal, variance `init_scale`: the scale of normalized
  tokens), sigma = exp(log_sigma) a learned bandwidth (init sqrt(D), so logit gaps start
  small). softmax(logits) is the normalized kernel: the closest centroid gets the most weight.

  Attributes:
    num_experts: E.
    init_scale: variance of the centroids at init.
    jitter_noise, dtype: as in `RouterLogits`.
  """
  num_experts: int
  init_scale: float = 1.0
  jitter_noise: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool) -> jax.Array:
    tokens = jitter(self, tokens, self.jitter_noise, deterministic, self.dtype)  # [G, S, D]
    model_dim = tokens.shape[-1]
    centroids = self.param('centroids', nn.initializers.normal(math.sqrt(self.init_scale)),
                           (self.num_experts, model_dim), jnp.float32).astype(self.dtype)
    # Shape: [E, D]
    log_sigma = self.param('log_sigma', nn.initializers.constant(0.5 * math.log(model_dim)), (),
                           jnp.float32)
    squared_distance = (jnp.sum(tokens**2, -1, keepdims=True)
                        - 2 * jnp.einsum('gsd,ed->gse', tokens, centroids)
                        + jnp.sum(centroids**2, -1))  # Shape: [G, S, E]
    return (-jnp.maximum(squared_distance, 0.0)
            / (2 * jnp.exp(2 * log_sigma)).astype(self.dtype))


def hash_logits(token_ids: jax.Array, num_experts: int) -> jax.Array:
  """Hash routing: token ids [G, S] -> logits [G, S, E], 0 at the expert (id * HASH_PRIME) % E
  (uint32 arithmetic) and -1e9 elsewhere, so the softmax is exactly one-hot.

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
