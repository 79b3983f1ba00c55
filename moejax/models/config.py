"""ModelConfig: every field of a Transformer model, checked once, hashable (a Flax module field).

The MoE fields are not copied here: they are MoeLayer's own fields, with its defaults, added to
ModelConfig from `MoeLayer` itself (all but those a model sets: `MOE_FIELDS_SET_BY_MODEL`). A
config is checked when it is built, by the model's own rules and by the layers' (each MoE layer
of each stack is constructed), and an error names the field as the user wrote it
(`model.top_p=0.0 is invalid: ...`).

`ModelConfig.from_dict(config.model)` turns the `model` section of an experiment config into one.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from moejax import layer as layer_lib
from moejax.errors import ConfigError
from moejax.experts import ACTIVATIONS
from moejax.layer import MoeLayer
from moejax.soft_moe import SoftMoeLayer

KINDS = ('decoder', 'encoder_decoder')
POSITIONS = ('rotary', 'relative')
ATTENTIONS = ('mha', 'mla')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# MoeLayer fields a model sets itself: layer field -> the model field it comes from (None: the
# model decides, `causal` per stack).
MOE_FIELDS_SET_BY_MODEL = {'ffn_dim': 'ffn_dim', 'activation': 'activation',
                           'glu': 'glu', 'router_dtype': 'router_dtype',
                           'balancing_bias': 'balancing_bias_rate', 'dtype': 'dtype',
                           'param_dtype': 'param_dtype', 'causal': None, 'decode_length': None}
MOE_DEFAULTS = {'num_experts': 8}  # MoeLayer fields without a default there
# Fields only an encoder may use: a causal decoder stack of an encoder-decoder leaves them out.
ENCODER_ONLY = {'routing': ('experts_choose',), 'batch_prioritized': (True,)}


@dataclasses.dataclass(frozen=True)
class _ModelFields:
  """A decoder-only LM or a T5-style encoder-decoder with a configurable MoE layout.

  Layout: block i (0-based, in each stack) has a sparse FFN when `moe_every > 0`,
  `(i + 1) % moe_every == 0` and i is not in `dense_layers`: `moe_every=2` is Switch's every other
  FFN, 1 makes all sparse, 0 none. An encoder-decoder's decoder may differ from its encoder
  (`num_decoder_layers`, `decoder_moe_every`: Switch-C's 15 sparse encoder blocks and 12 dense
  decoder blocks). Dense FFNs are `dense_ffn_dim` wide (Qwen-MoE's `intermediate_size`).
  `dense_baseline=True` replaces each sparse FFN by a dense FFN of width (K + shared) * F, the
  FLOP-matched twin (same per-token FLOPs up to the router's 2 * D * E).

  The MoE fields (`num_experts`, `num_selected_experts`, `routing`, capacity factors, `dispatch`,
  `router`, ...) are MoeLayer's, documented there. In an encoder-decoder, encoder-only settings
  (`routing='experts_choose'`, `batch_prioritized`) route the encoder; its causal decoder then
  routes tokens-choose in sequence order. A decoder-only model refuses them. With `soft_moe`, the
  encoder's Soft MoE layers take `num_experts`, `slots_per_expert`, `group_size`, `init_scale` and
  the FFN fields; the routing fields apply to the decoder's MoE layers only.

  Dtypes: every param is stored in `param_dtype` but the routers' (float32 whatever it is, as they
  compute: Switch's selective precision; D x E a layer) and the balancing biases (a float32 state,
  not a param: rate-sized steps would round away in bfloat16). `dtype` is the compute dtype,
  a separate choice: params are cast to it, up or down, where they are used.
  """
  vocab_size: int                     # V; the training code sets it from the tokenizer
  kind: str = 'decoder'
  num_layers: int = 4                 # blocks per stack (the encoder-decoder has two stacks)
  num_decoder_layers: int | None = None  # an encoder-decoder's decoder blocks; None: num_layers
  model_dim: int = 128                # D
  num_heads: int = 4
  head_dim: int | None = None         # None: model_dim // num_heads
  num_kv_heads: int | None = None     # key/value heads (grouped-query attention); None: num_heads
  attention_bias: bool = False        # biases on the query, key and value projections (Qwen)
  attention_out_bias: bool = False    # a bias on the attention's output (Qwen3, gpt-oss)
  qk_norm: bool = False               # RMSNorm over all of q and of k before the heads (OLMoE)
  qk_head_norm: bool = False          # RMSNorm over each head of q and k, one scale [A] (Qwen3)
  attention_sinks: bool = False       # a learned logit per head in the softmax's denominator
  # A decoder's causal query sees the keys of its last `sliding_window` positions, itself
  # included (None: all), in every block but `full_attention_layers` (gpt-oss's layer_types).
  sliding_window: int | None = None
  full_attention_layers: tuple[int, ...] = ()
  rope_theta: float = 10_000.0        # rotary positions' base (Mixtral: 1e6)
  # Rotary options (moejax.models.rotary): the share of each head's dims that turn (GLM-4.5: 0.5)
  # and YaRN context extension by `yarn_factor` (None: off) from `yarn_original_length`.
  rotary_fraction: float = 1.0
  yarn_factor: float | None = None
  yarn_original_length: int | None = None  # the context length trained before YaRN
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float | None = None
  yarn_mscale_all_dim: float | None = None
  yarn_attention_factor: float | None = None  # None: from the mscales
  yarn_truncate: bool = True          # floor and ceil the correction range (gpt-oss: False)
  # 'mha': multi-head attention (grouped-query with num_kv_heads); 'mla': multi-head latent
  # attention (moejax.models.mla: DeepSeek-V2/V3), a decoder's, its heads of the widths below.
  attention: str = 'mha'
  q_lora_rank: int | None = None      # MLA's query latent (None: queries straight from x)
  kv_lora_rank: int = 64              # MLA's key/value latent, what its decoding cache holds
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 16          # the rotated part of each query and key head
  v_head_dim: int = 32
  mla_softmax_mscale: bool = True     # the softmax scale times YaRN's mscale(mscale_all_dim)^2
  norm_eps: float = 1e-6              # every RMSNorm's epsilon (Mixtral, OLMoE: 1e-5)
  scaled_attention: bool = True       # logits / sqrt(head_dim); T5 and Switch leave them unscaled
  tie_embeddings: bool = False        # logits from the embedding, inputs scaled by D^-0.5 (T5)
  ffn_dim: int = 512                  # F: width of dense FFNs and of each expert
  activation: str = 'gelu'
  glu: bool = False
  dropout_rate: float = 0.0
  positions: str | None = None        # None: 'rotary' for decoders, 'relative' (T5) otherwise
  relative_buckets: int = 32
  relative_max_distance: int = 128
  decoder_start_id: int = 0           # the decoder's first input, before the first target (T5: pad)
  # Mixture of experts: the layout and what the model sets in its MoE layers.
  moe_every: int = 2
  decoder_moe_every: int | None = None  # an encoder-decoder's decoder layout; None: moe_every
  dense_layers: tuple[int, ...] = ()  # blocks kept dense in every stack (Qwen's mlp_only_layers)
  dense_ffn_dim: int | None = None    # the dense FFNs' width; None: ffn_dim
  dense_baseline: bool = False
  balancing_bias_rate: float = 0.0    # > 0: DeepSeek-V3 bias balancing, updated at this rate
  router_dtype: str = 'float32'       # the routers' compute dtype (Switch: float32)
  soft_moe: bool = False              # the encoder's sparse FFNs are Soft MoE (encoder_decoder)
  slots_per_expert: int = 1           # Soft MoE's P
  # Implementation.
  scan_layers: bool = False
  remat: bool = False
  dtype: str = 'float32'              # compute dtype: params are cast to it, whatever they are
  # Storage dtype of every param but the routers' (float32 always: `moejax.routers`); an import
  # takes its checkpoint's.
  param_dtype: str = 'float32'


def _moe_fields() -> list[tuple[str, Any, dataclasses.Field]]:
  """(name, type, field) of every MoeLayer field a model does not set, with MoeLayer's default
  (or MOE_DEFAULTS'), for `dataclasses.make_dataclass`."""
  set_by_model = set(MOE_FIELDS_SET_BY_MODEL) | {'parent', 'name'}
  fields = []
  for field in dataclasses.fields(MoeLayer):
    if field.name in set_by_model:
      continue
    default = MOE_DEFAULTS.get(field.name, field.default)
    fields.append((field.name, field.type, dataclasses.field(default=default)))
  return fields


@functools.cache  # every ModelConfig checks every field: evaluate each annotation once
def _field_type(annotation: Any) -> tuple[type, ...]:
  """The types a field of this annotation accepts: ('int | None' -> (int, NoneType))."""
  namespace = {**vars(layer_lib), **globals()}
  hint = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    return typing.get_args(hint)
  return (hint,)


class _ModelConfigChecks:
  """The checks and derived values of ModelConfig (its fields are made below)."""

  def __post_init__(self):
    self._check_types()
    self._check_model()
    self._check_layers()

  def _check_types(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      allowed = _field_type(field.type)
      if Any in allowed:
        continue
      if typing.get_origin(allowed[0]) is tuple:  # a tuple of ints (a JSON list when loaded)
        if isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
          object.__setattr__(self, field.name, tuple(value))
          continue
        raise ConfigError(field.name, value, 'it must be a list of ints', 'model')
      ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool))
               for t in allowed)
      if not ok and float in allowed and isinstance(value, int) and not isinstance(value, bool):
        object.__setattr__(self, field.name, float(value))  # 2 -> 2.0 for a float field
        ok = True
      if not ok:
        names = ' or '.join('None' if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(field.name, value, f'it must be {names}', 'model')

  def _check_model(self):
    def bad(field, allowed):
      return ConfigError(field, getattr(self, field), allowed, 'model')
    if self.kind not in KINDS:
      raise bad('kind', f'it must be one of {KINDS}')
    if self.positions is not None and self.positions not in POSITIONS:
      raise bad('positions', f'it must be one of {POSITIONS} or None')
    for field in ('dtype', 'router_dtype', 'param_dtype'):
      if getattr(self, field) not in DTYPES:
        raise bad(field, f'it must be one of {tuple(DTYPES)}')
    for field in ('vocab_size', 'num_layers', 'model_dim', 'num_heads', 'ffn_dim',
                  'slots_per_expert'):
      if getattr(self, field) < 1:
        raise bad(field, 'it must be >= 1')
    if self.head_dim is not None and self.head_dim < 1:
      raise bad('head_dim', 'it must be >= 1, or None')
    if self.head_dim is None and self.model_dim % self.num_heads:
      raise bad('num_heads', f'it must divide model_dim={self.model_dim} (or set head_dim)')
    if self.num_kv_heads is not None and (self.num_kv_heads < 1
                                          or self.num_heads % self.num_kv_heads):
      raise bad('num_kv_heads', f'it must be >= 1 and divide num_heads={self.num_heads}, or None')
    if self.qk_norm and self.qk_head_norm:
      raise bad('qk_head_norm', 'it normalizes q and k per head: set it or qk_norm, not both')
    self._check_window(bad)
    if self.rope_theta <= 0 or self.norm_eps <= 0:
      raise bad('rope_theta' if self.rope_theta <= 0 else 'norm_eps', 'it must be > 0')
    self._check_rotary(bad)
    self._check_latent_attention(bad)
    if self.activation not in ACTIVATIONS:  # the dense FFNs' too, not only the experts'
      raise bad('activation', f'it must be one of {tuple(ACTIVATIONS)}')
    if not 0 <= self.dropout_rate < 1:
      raise bad('dropout_rate', 'it must be in [0, 1)')
    for field in ('num_decoder_layers', 'dense_ffn_dim'):
      if getattr(self, field) is not None and getattr(self, field) < 1:
        raise bad(field, 'it must be >= 1, or None')
    for field in ('moe_every', 'decoder_moe_every'):
      if (getattr(self, field) or 0) < 0:
        raise bad(field, 'it must be >= 0 (0: no sparse layers)')
    most = max(self.stack_layers(False), self.stack_layers(True))
    if any(not 0 <= i < most for i in self.dense_layers):
      raise bad('dense_layers', f'each must be a block index in [0, {most})')
    if self.scan_layers and self.dense_layers:
      raise bad('dense_layers', 'scan_layers repeats one unit of blocks: use scan_layers=False')
    for cross in (False, True):
      if self.scan_layers and self.stack_layers(cross) % self.stack_period(cross):
        field = 'num_decoder_layers' if cross and self.num_decoder_layers else 'num_layers'
        raise bad(field, 'with scan_layers it must be a multiple of moe_every='
                  f'{self.stack_period(cross)}')
    if self.balancing_bias_rate < 0:
      raise bad('balancing_bias_rate', 'it must be >= 0 (0: off)')
    if self.kind == 'decoder':
      for field, encoder_only in ENCODER_ONLY.items():
        if getattr(self, field) in encoder_only:
          raise bad(field, 'it looks at later tokens of a group: only an encoder may use it '
                    "(kind='encoder_decoder' routes its encoder this way)")
      if self.soft_moe:
        raise bad('soft_moe', 'every slot mixes all tokens of a group, later ones included: '
                  "only an encoder may use it (kind='encoder_decoder')")

  def _check_rotary(self, bad):
    rotated = int(self.rotary_head_dim * self.rotary_fraction)
    if self.position_kind == 'rotary' and (not 0 < self.rotary_fraction <= 1 or rotated < 2
                                           or rotated % 2):
      raise bad('rotary_fraction', 'it must be in (0, 1] and turn an even number of each '
                f"head's {self.rotary_head_dim} rotary dims (here {rotated})")
    if self.yarn_factor is None:
      return
    if self.yarn_factor < 1:
      raise bad('yarn_factor', 'it must be >= 1, or None (no YaRN)')
    if self.yarn_original_length is None or self.yarn_original_length < 1:
      raise bad('yarn_original_length', 'YaRN (yarn_factor) needs the length trained before it')
    if self.yarn_beta_fast < self.yarn_beta_slow:
      raise bad('yarn_beta_fast', f'it must be >= yarn_beta_slow={self.yarn_beta_slow}')

  def _check_window(self, bad):
    if self.sliding_window is not None and self.sliding_window < 1:
      raise bad('sliding_window', 'it must be >= 1, or None (no window)')
    if self.sliding_window is not None and self.kind != 'decoder':
      raise bad('sliding_window', "only a decoder-only model (kind='decoder') has one")
    if self.full_attention_layers and self.sliding_window is None:
      raise bad('full_attention_layers', 'it names blocks without the window: set sliding_window')
    if any(not 0 <= i < self.num_layers for i in self.full_attention_layers):
      raise bad('full_attention_layers', f'each must be a block index in [0, {self.num_layers})')
    if self.scan_layers and self.full_attention_layers:
      raise bad('full_attention_layers', 'scan_layers repeats one unit of blocks: use '
                'scan_layers=False')

  def attention_window(self, layer: int) -> int | None:
    """The sliding window of block `layer`'s self-attention (a decoder's), None: all keys."""
    return None if layer in self.full_attention_layers else self.sliding_window

  def _check_latent_attention(self, bad):
    if self.attention not in ATTENTIONS:
      raise bad('attention', f'it must be one of {ATTENTIONS}')
    if self.attention != 'mla':
      return
    for field in ('kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim'):
      if getattr(self, field) < 1:
        raise bad(field, 'it must be >= 1')
    if self.q_lora_rank is not None and self.q_lora_rank < 1:
      raise bad('q_lora_rank', 'it must be >= 1, or None (no query latent)')
    unsupported = dict(kind=self.kind != 'decoder', positions=self.position_kind != 'rotary',
                       rotary_fraction=self.rotary_fraction != 1,
                       num_kv_heads=self.kv_heads != self.num_heads,
                       attention_bias=self.attention_bias,
                       attention_out_bias=self.attention_out_bias, qk_norm=self.qk_norm,
                       qk_head_norm=self.qk_head_norm, attention_sinks=self.attention_sinks,
                       sliding_window=self.sliding_window is not None)
    for field, refused in unsupported.items():
      if refused:
        raise bad(field, "multi-head latent attention (attention='mla') is a decoder's, with "
                  'rotary positions on all qk_rope_head_dim dims, a latent per token for all '
                  'heads and no biases, q/k norms, sinks or window')

  def _check_layers(self):
    """Build each stack's MoE layer, so the layers' own rules check the fields."""
    if not self.has_sparse_layers:
      return
    try:
      for causal in ((True,) if self.kind == 'decoder' else (False, True)):
        self.moe_layer(causal)
    except ConfigError as error:
      field = MOE_FIELDS_SET_BY_MODEL.get(error.field, error.field) or error.field
      raise ConfigError(field, getattr(self, field, error.value), error.reason, 'model') from None

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ConfigError(unknown[0], fields[unknown[0]], f'no such field; known: {sorted(known)}',
                        'model')
    return cls(**fields)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def stack_layers(self, cross_attention: bool = False) -> int:
    """Blocks of a stack: num_layers, or num_decoder_layers (when set) for the stack that
    cross-attends (an encoder-decoder's decoder)."""
    return (self.num_decoder_layers or self.num_layers) if cross_attention else self.num_layers

  def stack_moe_every(self, cross_attention: bool = False) -> int:
    """A stack's moe_every: decoder_moe_every (when set) for an encoder-decoder's decoder."""
    if cross_attention and self.decoder_moe_every is not None:
      return self.decoder_moe_every
    return self.moe_every

  def stack_period(self, cross_attention: bool = False) -> int:
    """Blocks in one repeating unit of a stack's layout (what `nn.scan` scans over)."""
    return max(self.stack_moe_every(cross_attention), 1)

  @property
  def has_sparse_layers(self) -> bool:
    """Whether any block of any stack has a (possibly dense-baseline) MoE FFN slot."""
    stacks = (False, True) if self.kind == 'encoder_decoder' else (False,)
    return any(self.is_sparse(i, cross) for cross in stacks
               for i in range(self.stack_layers(cross)))

  @property
  def dense_width(self) -> int:
    """The width of the layout's dense FFNs: dense_ffn_dim, or ffn_dim."""
    return self.dense_ffn_dim or self.ffn_dim

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    """The params' dtype (`param_dtype`); the routers' params are float32 whatever it is."""
    return DTYPES[self.param_dtype]

  @property
  def rotary_head_dim(self) -> int:
    """The width of the heads rotary positions turn (part of): A, or MLA's qk_rope_head_dim."""
    return self.qk_rope_head_dim if self.attention == 'mla' else self.attention_head_dim

  @property
  def attention_head_dim(self) -> int:
    """A: head_dim, or model_dim // num_heads when it is None."""
    return self.head_dim or self.model_dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads: num_kv_heads, or num_heads when it is None."""
    return self.num_kv_heads or self.num_heads

  @property
  def position_kind(self) -> str:
    return self.positions or ('rotary' if self.kind == 'decoder' else 'relative')

  def is_sparse(self, layer: int, cross_attention: bool = False) -> bool:
    """Whether block `layer` of a stack (`cross_attention`: an encoder-decoder's decoder) has a
    (possibly dense-baseline) MoE FFN slot."""
    every = self.stack_moe_every(cross_attention)
    return every > 0 and (layer + 1) % every == 0 and layer not in self.dense_layers

  def moe_kwargs(self, causal: bool = True,
                 decode_length: int | None = None) -> dict[str, Any]:
    """MoeLayer fields of a stack's MoE layers (causal: a decoder stack; decode_length: a
    decoder stack sampling with a cache of that length)."""
    kwargs = {name: getattr(self, name) for name, _, _ in _moe_fields()}
    if causal and self.kind == 'encoder_decoder':  # encoder-only settings route the encoder
      kwargs.update(routing='tokens_choose' if self.routing == 'experts_choose'
                    else self.routing, batch_prioritized=False)
    return dict(kwargs, ffn_dim=self.ffn_dim, activation=self.activation, glu=self.glu,
                router_dtype=DTYPES[self.router_dtype], balancing_bias=self.balancing_bias_rate > 0,
                dtype=self.compute_dtype, param_dtype=self.storage_dtype, causal=causal,
                decode_length=decode_length)

  def moe_layer(self, causal: bool, name: str | None = None, decode_length: int | None = None):
    """The MoE layer of a stack: a MoeLayer, or in an encoder with `soft_moe` a SoftMoeLayer."""
    if self.soft_moe and not causal:
      return SoftMoeLayer(self.num_experts, self.ffn_dim, slots_per_expert=self.slots_per_expert,
                          group_size=self.group_size, activation=self.activation, glu=self.glu,
                          causal=False, init_scale=self.init_scale, dtype=self.compute_dtype,
                          param_dtype=self.storage_dtype, name=name)
    return MoeLayer(**self.moe_kwargs(causal, decode_length), name=name)

  @property
  def dense_baseline_width(self) -> int:
    """Width of the dense FFN that replaces a sparse one in the baseline: (K + shared) * F."""
    return (self.num_selected_experts + self.num_shared_experts) * self.ffn_dim


ModelConfig = dataclasses.make_dataclass(
    'ModelConfig', _moe_fields(), bases=(_ModelConfigChecks, _ModelFields), frozen=True,
    namespace={'__doc__': _ModelFields.__doc__, '__module__': __name__})


def per_token_flops(config: ModelConfig, length: int, target_length: int | None = None) -> float:
  """Forward-pass matmul FLOPs per (target) token, by formula (2 FLOPs per multiply-add).

  A sparse FFN costs K (+ shared) expert FFNs of width F plus the router (2 * D * E); its dense
  baseline one FFN of width (K + shared) * F. Top-p routing is counted at its cap K. A Soft MoE
  layer (the encoder's, with `soft_moe`) costs its slot logits, dispatch and combine (2 * D * N
  each, N = E * P slots) and N / S expert FFNs per token (S: the group size). Attention
  scores count all L keys, as XLA does for a masked full product; multi-head latent attention
  makes each token's keys and values from its latent (`_latent_attention_flops`). For the
  encoder-decoder,
  `length` is the encoder's and `target_length` the decoder's; encoder FLOPs are spread over the
  target tokens.
  """
  d, inner = config.model_dim, config.num_heads * config.attention_head_dim
  kv_inner = config.kv_heads * config.attention_head_dim
  ffn_mats = 3 if config.glu else 2

  def ffn(layer, encoder, cross):
    if not config.is_sparse(layer, cross):
      return 2 * ffn_mats * d * config.dense_width
    if config.dense_baseline:
      return 2 * ffn_mats * d * config.dense_baseline_width
    if encoder and config.soft_moe:
      slots = config.num_experts * config.slots_per_expert
      group = config.group_size or length
      return 3 * 2 * d * slots + slots / group * 2 * ffn_mats * d * config.ffn_dim
    k = config.num_selected_experts + config.num_shared_experts
    return k * 2 * ffn_mats * d * config.ffn_dim + 2 * d * config.num_experts

  def stack(keys, cross_keys=None, cross_ratio=0.0):
    attention = 2 * 2 * d * (inner + kv_inner) + 2 * 2 * keys * inner
    if config.attention == 'mla':
      attention = _latent_attention_flops(config, keys)
    if cross_keys is not None:  # q, out per target token; k, v per encoder token
      attention += 2 * 2 * d * inner * (1 + cross_ratio) + 2 * 2 * cross_keys * inner
    cross = cross_keys is not None
    return sum(attention + ffn(i, not cross and config.kind == 'encoder_decoder', cross)
               for i in range(config.stack_layers(cross)))

  logits = 2 * d * config.vocab_size
  if config.kind == 'decoder':
    return stack(length) + logits
  target_length = target_length or length
  ratio = length / target_length
  return stack(length) * ratio + stack(target_length, length, ratio) + logits


def _latent_attention_flops(config: ModelConfig, keys: int) -> float:
  """Multi-head latent attention's matmul FLOPs per token over `keys` keys: the query (through
  its latent with q_lora_rank), the key/value latent and rotated key, their up-projection to H
  keys and values, the scores and weighted values, the output."""
  d, h = config.model_dim, config.num_heads
  qk, v = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
  query = (d * h * qk if config.q_lora_rank is None
           else config.q_lora_rank * (d + h * qk))
  latent = d * (config.kv_lora_rank + config.qk_rope_head_dim)
  up = config.kv_lora_rank * h * (config.qk_nope_head_dim + v)
  return 2 * (query + latent + up + h * v * d) + 2 * keys * h * (qk + v)
