"""ModelConfig: every field of a Transformer model, checked once, hashable (a Flax module field).

`ModelConfig.from_dict(config.model)` turns the `model` section of an experiment config into one; an
unknown or badly typed field is an error that names it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

KINDS = ('decoder', 'encoder_decoder')
POSITIONS = ('rotary', 'relative')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only LM or a T5-style encoder-decoder with a configurable MoE layout.

  Layout: block i (0-based, in each stack) has a sparse FFN when `moe_every > 0` and
  `(i + 1) % moe_every == 0`: `moe_every=2` is Switch's every other FFN, 1 makes all sparse, 0 none.
  `dense_baseline=True` replaces each sparse FFN by a dense FFN of width (K + shared) * F, the
  FLOP-matched twin (same per-token FLOPs up to the router's 2 * D * E).
  """
  vocab_size: int                     # V; the training code sets it from the tokenizer
  kind: str = 'decoder'
  num_layers: int = 4                 # blocks per stack (the encoder-decoder has two stacks)
  model_dim: int = 128                # D
  num_heads: int = 4
  head_dim: int | None = None         # None: model_dim // num_heads
  ffn_dim: int = 512                  # F: width of dense FFNs and of each expert
  activation: str = 'gelu'
  glu: bool = False
  dropout_rate: float = 0.0
  positions: str | None = None        # None: 'rotary' for decoders, 'relative' (T5) otherwise
  relative_buckets: int = 32
  relative_max_distance: int = 128
  # Mixture of experts.
  moe_every: int = 2
  dense_baseline: bool = False
  num_experts: int = 8                # E
  num_selected_experts: int = 1       # K
  normalize_weights: bool = False     # top-K combine weights renormalized to sum to 1
  train_capacity_factor: float | None = 1.25  # None: dropless
  eval_capacity_factor: float | None = 2.0
  min_expert_capacity: int = 4
  group_size: int | None = None
  dispatch: str = 'einsum'
  router_init_scale: float = 1.0
  init_scale: float = 1.0
  jitter_noise: float = 0.0
  expert_dropout: float = 0.0
  router: str = 'linear'              # 'linear', 'cosine', 'distance', 'gumbel' (not 'hash': the
                                      # models do not pass token ids to their MoE layers)
  top_p: float | None = None          # top-p routing, capped at K
  num_shared_experts: int = 0         # experts every token goes through besides its routed ones
  balancing_bias_rate: float = 0.0    # > 0: DeepSeek-V3 bias balancing, updated at this rate
  # Implementation.
  scan_layers: bool = False
  remat: bool = False
  dtype: str = 'float32'              # compute dtype; params are float32, the router float32

  def __post_init__(self):
    def bad(field, allowed):
      return ValueError(f'model.{field}={getattr(self, field)!r} is invalid: {allowed}.')
    if self.kind not in KINDS:
      raise bad('kind', f'it must be one of {KINDS}')
    if self.positions is not None and self.positions not in POSITIONS:
      raise bad('positions', f'it must be one of {POSITIONS} or None')
    if self.dtype not in DTYPES:
      raise bad('dtype', f'it must be one of {tuple(DTYPES)}')
    for field in ('vocab_size', 'num_layers', 'model_dim', 'num_heads', 'ffn_dim'):
      if getattr(self, field) < 1:
        raise bad(field, 'it must be >= 1')
    if self.head_dim is None and self.model_dim % self.num_heads:
      raise bad('num_heads', f'it must divide model_dim={self.model_dim} (or set head_dim)')
    if self.moe_every < 0:
      raise bad('moe_every', 'it must be >= 0 (0: no sparse layers)')
    if self.scan_layers and self.num_layers % self.period:
      raise bad('num_layers', f'with scan_layers it must be a multiple of moe_every={self.period}')
    if self.moe_every and not 1 <= self.num_selected_experts <= self.num_experts:
      raise bad('num_selected_experts', f'it must be in [1, num_experts={self.num_experts}]')
    if self.router == 'hash':
      raise bad('router', 'the models do not pass token ids to their MoE layers; use MoeLayer('
                "router='hash') with token_ids directly")
    if self.balancing_bias_rate < 0:
      raise bad('balancing_bias_rate', 'it must be >= 0 (0: off)')

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f'unknown model config fields {unknown}; known: {sorted(known)}')
    return cls(**fields)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def period(self) -> int:
    """Blocks in one repeating unit of the layout (what `nn.scan` scans over)."""
    return max(self.moe_every, 1)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def heads_dim(self) -> int:
    return self.head_dim or self.model_dim // self.num_heads

  @property
  def position_kind(self) -> str:
    return self.positions or ('rotary' if self.kind == 'decoder' else 'relative')

  def is_sparse(self, layer: int) -> bool:
    """Whether block `layer` of a stack has a (possibly dense-baseline) MoE FFN slot."""
    return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

  def moe_kwargs(self) -> dict[str, Any]:
    """MoeLayer fields (all but `causal`, which depends on the stack)."""
    return dict(num_experts=self.num_experts, expert_hidden_dim=self.ffn_dim,
                num_selected_experts=self.num_selected_experts,
                normalize_weights=self.normalize_weights,
                train_capacity_factor=self.train_capacity_factor,
                eval_capacity_factor=self.eval_capacity_factor,
                min_expert_capacity=self.min_expert_capacity, group_size=self.group_size,
                dispatch=self.dispatch, activation=self.activation, glu=self.glu,
                router_init_scale=self.router_init_scale, init_scale=self.init_scale,
                jitter_noise=self.jitter_noise, expert_dropout=self.expert_dropout,
                router=self.router, top_p=self.top_p,
                num_shared_experts=self.num_shared_experts,
                balancing_bias=self.balancing_bias_rate > 0, dtype=self.compute_dtype)

  @property
  def dense_baseline_width(self) -> int:
    """Width of the dense FFN that replaces a sparse one in the baseline: (K + shared) * F."""
    return (self.num_selected_experts + self.num_shared_experts) * self.ffn_dim


def per_token_flops(config: ModelConfig, length: int, target_length: int | None = None) -> float:
  """Forward-pass matmul FLOPs per (target) token, by formula (2 FLOPs per multiply-add).

  A sparse FFN costs K (+ shared) expert FFNs of width F plus the router (2 * D * E); its dense
  baseline one FFN of width (K + shared) * F. Top-p routing is counted at its cap K. Attention
  scores count all L keys, as XLA does for a masked full product. For the encoder-decoder,
  `length` is the encoder's and `target_length` the decoder's; encoder FLOPs are spread over the
  target tokens.
  """
  d, inner = config.model_dim, config.num_heads * config.heads_dim
  ffn_mats = 3 if config.glu else 2

  def ffn(layer):
    if not config.is_sparse(layer):
      return 2 * ffn_mats * d * config.ffn_dim
    if config.dense_baseline:
      return 2 * ffn_mats * d * config.dense_baseline_width
    k = config.num_selected_experts + config.num_shared_experts
    return k * 2 * ffn_mats * d * config.ffn_dim + 2 * d * config.num_experts

  def stack(keys, cross_keys=None, cross_ratio=0.0):
    attention = 2 * 4 * d * inner + 2 * 2 * keys * inner
    if cross_keys is not None:  # q, out per target token; k, v per encoder token
      attention += 2 * 2 * d * inner * (1 + cross_ratio) + 2 * 2 * cross_keys * inner
    return sum(attention + ffn(i) for i in range(config.num_layers))

  logits = 2 * d * config.vocab_size
  if config.kind == 'decoder':
    return stack(length) + logits
  target_length = target_length or length
  ratio = length / target_length
  return stack(length) * ratio + stack(target_length, length, ratio) + logits
