"""Hugging Face MoE checkpoints in and out: the Mixtral, OLMoE and Qwen2-MoE (Qwen1.5-MoE)
decoders and the Switch Transformers encoder-decoder.

`from_hf(directory)` reads a hub directory (config.json, model.safetensors or its shards) into a
`ModelConfig` and moejax params; `to_hf(config, params, directory, model_type)` writes them back
in the family's layout (one file, or shards with the hub's index), with a tokenizer's files. Both
go one tensor at a time (`moejax.convert.safetensors`): the input is memory-mapped, each moejax
array is built from its own input tensors only, and each hub tensor is written as it is made.

Each family is a table: which config fields become which `ModelConfig` fields (the settings a
family fixes, such as SwiGLU experts, rotary positions and dropless top-K routing, included), and
for every moejax parameter the hub tensors it is made of (`Tensor`). The mapping is a reshape or a
transpose (and a stack over experts), so import -> export -> import is bit-exact.

Dtypes: an import keeps the checkpoint's (`checkpoint_dtype`: float32 or bfloat16, as its expert
weights are), so the params take the checkpoint's bytes; only the routers' params are float32
(upcast exactly). An export writes every tensor in the expert weights' dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from moejax.balancing import BIAS_COLLECTION
from moejax.convert.safetensors import INDEX, SINGLE, Checkpoint, write_checkpoint
from moejax.data.tokenizers import HUB_TOKENIZER_CONFIGS, HUB_TOKENIZER_FILES
from moejax.errors import ConfigError, InputError
from moejax.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One moejax parameter and the hub tensors it is made of.

  kind 'same': the hub tensor as it is (the embedding); 'flat': a 1-D hub tensor reshaped (norm
  scales, biases; a scale [H, A] of the heads' q-norm is [H * A] there); 'linear': a torch
  Linear weight [out, in] transposed, then reshaped to `shape` whose first `in_axes` axes are the
  input's; 'experts': one Linear weight per expert, each transposed, stacked [E, in, out];
  'shared': one wide Linear weight [S * F, D] cut into S experts [S, D, F] (a SwiGLU expert of
  width S * F is the sum of S experts of width F over its slices of hidden units).
  """
  path: tuple[str, ...]
  names: tuple[str, ...]
  shape: tuple[int, ...]
  kind: str = 'flat'
  in_axes: int = 1

  def to_moejax(self, arrays: list[np.ndarray]) -> np.ndarray:
    """The moejax array, in memory of its own (copied out of the hub tensors' memory maps once)."""
    if self.kind == 'experts':
      array = np.stack([a.T for a in arrays])
    elif self.kind == 'shared':
      experts, width, hidden = self.shape
      array = arrays[0].T.reshape(width, experts, hidden).transpose(1, 0, 2)
    else:
      array = (arrays[0].T if self.kind == 'linear' else arrays[0]).reshape(self.shape)
    return np.require(array, requirements=['C', 'O'])

  def hub_shapes(self) -> list[tuple[int, ...]]:
    if self.kind == 'experts':
      return [self.shape[:0:-1]] * self.shape[0]
    if self.kind == 'linear':
      inputs = int(np.prod(self.shape[:self.in_axes]))
      return [(int(np.prod(self.shape)) // inputs, inputs)]
    if self.kind == 'shared':
      return [(self.shape[0] * self.shape[2], self.shape[1])]
    return [self.shape if self.kind == 'same' else (int(np.prod(self.shape)),)]

  def to_hub(self, array: np.ndarray) -> Iterator[np.ndarray]:
    """The hub tensors of `array`, made one at a time (an expert's as it is asked for)."""
    if self.kind == 'experts':
      return (np.ascontiguousarray(a.T) for a in array)
    if self.kind == 'linear':
      return iter([np.ascontiguousarray(array.reshape(self.hub_shapes()[0][::-1]).T)])
    if self.kind == 'shared':
      return iter([np.ascontiguousarray(array.transpose(1, 0, 2).reshape(self.shape[1], -1).T)])
    return iter([array.reshape(self.hub_shapes()[0])])

  def params(self, arrays: list[np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    """{param path: moejax array} made of the hub tensors `arrays`: this one param (a family
    module's kinds of entry may make several of one hub tensor)."""
    return {self.path: self.to_moejax(arrays)}

  def param_shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {self.path: self.shape}

  def hub_arrays(self, param: Callable[[tuple[str, ...]], np.ndarray]) -> Iterator[np.ndarray]:
    """The hub tensors, made of the params `param(path)` returns."""
    return self.to_hub(param(self.path))


# Non-trainable collections a checkpoint may fill besides the params (DeepSeek-V3's
# e_score_correction_bias: moejax's balancing bias).
STATE_COLLECTIONS = (BIAS_COLLECTION,)

# Fields of any hub config.json without effect on moejax's numbers: hub metadata (the tensors,
# not `torch_dtype`, decide the dtype), the generation cache, initialization, the training losses'
# coefficients (moejax's `train.*` set them), what the reference returns besides logits, the
# length rotary positions were trained to (moejax computes them at any position), and the pad id
# (padding is masked by weights, never by its id).
HUB_ACCEPTED = ('architectures', 'model_type', 'torch_dtype', 'dtype', 'transformers_version',
                '_name_or_path', 'use_cache', 'output_router_logits', 'initializer_range',
                'router_aux_loss_coef', 'max_position_embeddings', 'pad_token_id')


@dataclasses.dataclass(frozen=True)
class Family:
  """How one hub `model_type` maps onto moejax, and what it does with each config.json field:
  `implemented` (read into the ModelConfig or the layout, with the reference config class's
  `defaults` where a file leaves one out), `accepted` (no effect on moejax's numbers; besides
  HUB_ACCEPTED) or `refused` (field -> the one value moejax implements; another is refused in one
  line naming it). `tests/test_hub_configs.py` checks the three cover every field of
  transformers 4.57.6's config class of the family."""
  model_type: str
  model_config: Callable[[dict], ModelConfig]  # hub config.json (defaults filled) -> ModelConfig
  tensors: Callable[[ModelConfig], list[Tensor]]  # every param, in hub order
  hub_config: Callable[[ModelConfig], dict]  # the family's config.json fields from a ModelConfig
  implemented: tuple[str, ...]
  accepted: tuple[str, ...]
  refused: dict[str, Any]
  defaults: dict[str, Any]
  # A hub directory's tensors by name (`name in it`, `it.tensor(name)`): a family whose
  # checkpoints store some tensors quantized reads them dequantized.
  open: Callable[[str], Any] = Checkpoint

  def read(self, hf: dict) -> ModelConfig:
    """The ModelConfig of a config.json: refused settings raise InputError naming the field."""
    for field, supported in self.refused.items():
      if hf.get(field, supported) != supported:
        raise InputError(f'{self.model_type} checkpoint: {field}={hf[field]!r} is not '
                         f'supported (only {supported!r})')
    return self.model_config({**self.defaults, **hf})


# What every decoder family here refuses: another activation than SwiGLU's, a tied output, rotary
# scaling, attention dropout (moejax has none: fine-tuning would differ).
DECODER_REFUSED = dict(hidden_act='silu', tie_word_embeddings=False, rope_scaling=None,
                       attention_dropout=0.0)
DECODER_IMPLEMENTED = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                       'num_key_value_heads', 'rms_norm_eps', 'rope_theta', 'num_experts_per_tok',
                       'bos_token_id', 'eos_token_id')


def _decoder_fields(hf: dict) -> dict[str, Any]:
  """ModelConfig fields every family here shares: a pre-norm RMSNorm decoder with rotary
  positions, SwiGLU experts, an untied output layer, float32 routers, dropless routing."""
  heads, width = hf['num_attention_heads'], hf['hidden_size']
  head_dim = hf.get('head_dim')  # None (or D / H) in most: ModelConfig's None
  return dict(vocab_size=hf['vocab_size'], kind='decoder', num_layers=hf['num_hidden_layers'],
              decoder_start_id=_decoder_start(hf),
              model_dim=width, num_heads=heads,
              head_dim=None if head_dim in (None, width // heads) else head_dim,
              num_kv_heads=hf.get('num_key_value_heads') or heads, activation='silu', glu=True,
              positions='rotary', rope_theta=float(hf['rope_theta']),
              norm_eps=float(hf['rms_norm_eps']), num_selected_experts=hf['num_experts_per_tok'],
              train_capacity_factor=None, eval_capacity_factor=None, router_dtype='float32')


def _decoder_start(hf: dict) -> int:
  """A decoder LM's first input: bos, else eos (the end of the document before; OLMoE and Qwen
  have no bos), as `moejax.data.tokenizers` decides from the tokenizer."""
  for field in ('bos_token_id', 'eos_token_id'):
    value = hf.get(field)
    value = value[0] if isinstance(value, list) and value else value
    if isinstance(value, int):
      return value
  return 0


def _block(config: ModelConfig, layer: int, stack: str = 'decoder') -> tuple[str, ...]:
  """The params path of block `layer` of a stack (unscanned)."""
  cross = stack == 'decoder' and config.kind == 'encoder_decoder'
  period = config.stack_period(cross)
  if layer >= config.stack_layers(cross) // period * period:
    return (stack, f'block_{layer}')
  return (stack, f'unit_{layer // period}', f'block_{layer % period}')


def _attention(path: tuple, hub: str, config: ModelConfig,
               names: tuple[str, str, str, str] = ('q_proj', 'k_proj', 'v_proj', 'o_proj'),
               ) -> list[Tensor]:
  """An attention layer at `path` from the hub's `hub`.{q, k, v, o} projections."""
  d, h, kv, a = config.model_dim, config.num_heads, config.kv_heads, config.attention_head_dim
  out = []
  for name, hub_name, heads in zip(('query', 'key', 'value'), names, (h, kv, kv)):
    out.append(Tensor((*path, name, 'kernel'), (f'{hub}.{hub_name}.weight',), (d, heads, a),
                      'linear'))
    if config.attention_bias:
      out.append(Tensor((*path, name, 'bias'), (f'{hub}.{hub_name}.bias',), (heads, a)))
  if config.qk_norm or config.qk_head_norm:
    shapes = ((a,), (a,)) if config.qk_head_norm else ((h, a), (kv, a))
    out += [Tensor((*path, 'query_norm', 'scale'), (f'{hub}.q_norm.weight',), shapes[0]),
            Tensor((*path, 'key_norm', 'scale'), (f'{hub}.k_norm.weight',), shapes[1])]
  out.append(Tensor((*path, 'out', 'kernel'), (f'{hub}.{names[3]}.weight',), (h, a, d),
                    'linear', in_axes=2))
  if config.attention_out_bias:
    out.append(Tensor((*path, 'out', 'bias'), (f'{hub}.{names[3]}.bias',), (d,)))
  return out


def _experts(config: ModelConfig, prefix: str, block: tuple, names: tuple[str, ...],
             router: str) -> list[Tensor]:
  """The router and the experts under `prefix`: `names` (with '{e}' for the expert's number)
  are the gated, the up and the down projection of SwiGLU experts, the in and the out
  projection of plain ones."""
  e, d, f = config.num_experts, config.model_dim, config.ffn_dim
  per_expert = lambda name: tuple(f'{prefix}.{name}.weight'.replace('{e}', str(i))
                                  for i in range(e))
  moe = (*block, 'moe')
  out = [Tensor((*moe, 'router', 'dense', 'kernel'), (f'{prefix}.{router}.weight',), (d, e),
                'linear'),
         Tensor((*moe, 'experts', 'wi'), per_expert(names[0]), (e, d, f), 'experts')]
  if config.glu:
    out.append(Tensor((*moe, 'experts', 'wi_gate'), per_expert(names[1]), (e, d, f), 'experts'))
  return out + [Tensor((*moe, 'experts', 'wo'), per_expert(names[-1]), (e, f, d), 'experts')]


def decoder_tensors(config: ModelConfig, moe: Callable[[str, tuple], list[Tensor]],
                    attention: Callable[[tuple, str, ModelConfig], list[Tensor]] | None = None,
                    ) -> list[Tensor]:
  """The params of a Llama-style decoder; `moe(hub prefix of the layer, block path)` gives
  each sparse FFN's, `attention(path, hub prefix, config)` each self-attention's (default: q, k,
  v and o projections)."""
  attention = attention or _attention
  d = config.model_dim
  out = [Tensor(('embed', 'embedding'), ('model.embed_tokens.weight',), (config.vocab_size, d),
                'same')]
  for layer in range(config.num_layers):
    block, prefix = _block(config, layer), f'model.layers.{layer}'
    out.append(Tensor((*block, 'pre_attention_norm', 'scale'),
                      (f'{prefix}.input_layernorm.weight',), (d,)))
    out += attention((*block, 'attention'), f'{prefix}.self_attn', config)
    out.append(Tensor((*block, 'pre_ffn_norm', 'scale'),
                      (f'{prefix}.post_attention_layernorm.weight',), (d,)))
    if config.is_sparse(layer):
      out += moe(prefix, block)
    else:  # a dense SwiGLU FFN (Qwen's mlp_only_layers)
      f, hub = config.dense_width, f'{prefix}.mlp'
      out += [Tensor((*block, 'mlp', 'wi', 'kernel'), (f'{hub}.gate_proj.weight',), (d, f),
                     'linear'),
              Tensor((*block, 'mlp', 'wi_gate', 'kernel'), (f'{hub}.up_proj.weight',), (d, f),
                     'linear'),
              Tensor((*block, 'mlp', 'wo', 'kernel'), (f'{hub}.down_proj.weight',), (f, d),
                     'linear')]
  return out + [Tensor(('decoder', 'final_norm', 'scale'), ('model.norm.weight',), (d,)),
                Tensor(('logits', 'kernel'), ('lm_head.weight',), (d, config.vocab_size),
                       'linear')]


def _qwen_moe(config: ModelConfig, prefix: str, block: tuple) -> list[Tensor]:
  """Qwen2-MoE's routed experts, then its shared expert cut into `num_shared_experts` of width
  F, and the shared expert's gate."""
  shared, hub = (*block, 'moe', 'shared_experts'), f'{prefix}.mlp.shared_expert'
  s, d, f = config.num_shared_experts, config.model_dim, config.ffn_dim
  routed = ('experts.{e}.gate_proj', 'experts.{e}.up_proj', 'experts.{e}.down_proj')
  return [*_experts(config, f'{prefix}.mlp', block, routed, 'gate'),
          Tensor((*shared, 'wi'), (f'{hub}.gate_proj.weight',), (s, d, f), 'shared'),
          Tensor((*shared, 'wi_gate'), (f'{hub}.up_proj.weight',), (s, d, f), 'shared'),
          Tensor((*shared, 'wo'), (f'{hub}.down_proj.weight',), (s, f, d), 'linear', in_axes=2),
          Tensor((*block, 'moe', 'shared_expert_gate', 'kernel'),
                 (f'{prefix}.mlp.shared_expert_gate.weight',), (d, 1), 'linear')]


def switch_tensors(config: ModelConfig) -> list[Tensor]:
  """The params of a Switch Transformers (T5 v1.0) encoder-decoder."""
  d, f, v = config.model_dim, config.ffn_dim, config.vocab_size
  out = [Tensor(('embed', 'embedding'), ('shared.weight',), (v, d), 'same')]
  for stack in ('encoder', 'decoder'):
    out.append(Tensor((stack, 'relative_bias', 'rel_embedding'),
                      (f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',),
                      (config.relative_buckets, config.num_heads), 'same'))
    cross = stack == 'decoder'
    for layer in range(config.stack_layers(cross)):
      block, prefix = _block(config, layer, stack), f'{stack}.block.{layer}.layer'
      out.append(Tensor((*block, 'pre_attention_norm', 'scale'),
                        (f'{prefix}.0.layer_norm.weight',), (d,)))
      out += _attention((*block, 'attention'), f'{prefix}.0.SelfAttention', config,
                        ('q', 'k', 'v', 'o'))
      ffn = 1  # the FFN's sublayer: after self-attention, and cross-attention in the decoder
      if stack == 'decoder':
        out.append(Tensor((*block, 'pre_cross_attention_norm', 'scale'),
                          (f'{prefix}.1.layer_norm.weight',), (d,)))
        out += _attention((*block, 'cross_attention'), f'{prefix}.1.EncDecAttention', config,
                          ('q', 'k', 'v', 'o'))
        ffn = 2
      out.append(Tensor((*block, 'pre_ffn_norm', 'scale'),
                        (f'{prefix}.{ffn}.layer_norm.weight',), (d,)))
      if config.is_sparse(layer, cross):
        out += _experts(config, f'{prefix}.{ffn}.mlp', block,
                        ('experts.expert_{e}.wi', 'experts.expert_{e}.wo'), 'router.classifier')
      else:
        out += [Tensor((*block, 'mlp', 'wi', 'kernel'), (f'{prefix}.{ffn}.mlp.wi.weight',),
                       (d, f), 'linear'),
                Tensor((*block, 'mlp', 'wo', 'kernel'), (f'{prefix}.{ffn}.mlp.wo.weight',),
                       (f, d), 'linear')]
    out.append(Tensor((stack, 'final_norm', 'scale'), (f'{stack}.final_layer_norm.weight',),
                      (d,)))
  if not config.tie_embeddings:
    out.append(Tensor(('logits', 'kernel'), ('lm_head.weight',), (d, v), 'linear'))
  return out


def _mixtral_config(hf: dict) -> ModelConfig:
  return ModelConfig(**_decoder_fields(hf), ffn_dim=hf['intermediate_size'], moe_every=1,
                     num_experts=hf['num_local_experts'], normalize_weights=True,
                     jitter_noise=float(hf['router_jitter_noise']))


def _olmoe_config(hf: dict) -> ModelConfig:
  return ModelConfig(**_decoder_fields(hf), ffn_dim=hf['intermediate_size'], moe_every=1,
                     num_experts=hf['num_experts'], normalize_weights=hf['norm_topk_prob'],
                     qk_norm=True)


def _qwen_config(hf: dict) -> ModelConfig:
  """Qwen2-MoE: layer i is sparse when (i + 1) % decoder_sparse_step == 0 and i is not in
  mlp_only_layers (moejax's rule, with dense_layers), its dense FFNs intermediate_size wide."""
  width, shared = hf['moe_intermediate_size'], hf['shared_expert_intermediate_size']
  if shared % width:
    raise InputError(f'qwen2_moe checkpoint: shared_expert_intermediate_size={shared} is not a '
                     f'multiple of moe_intermediate_size={width}')
  return ModelConfig(**_decoder_fields(hf), ffn_dim=width, moe_every=hf['decoder_sparse_step'],
                     dense_layers=tuple(hf['mlp_only_layers'] or ()),
                     dense_ffn_dim=hf['intermediate_size'],
                     num_experts=hf['num_experts'], normalize_weights=hf['norm_topk_prob'],
                     attention_bias=hf.get('qkv_bias', True), num_shared_experts=shared // width,
                     shared_expert_gate=True)


def switch_sparse(step: int, layer: int) -> bool:
  """Whether transformers 4.57.6 makes block `layer` of a Switch stack sparse, for its
  `*_sparse_step` (0: none; a file without the step gets layers // sparse layers, or the number
  of layers when none is sparse, which still makes block 1 sparse)."""
  return step > 0 and (step == 1 or layer % step == 1)


def _switch_layout(hf: dict) -> dict[str, Any]:
  """moejax's layout fields (moe_every, decoder_moe_every, dense_layers) for the reference's
  sparse blocks: steps 0, 1 and 2 are moe_every's own rule; another step k (sparse at
  i % k == 1) is moe_every 1 with the other blocks in dense_layers, which both stacks share."""
  layers = {False: hf['num_layers'], True: hf['num_decoder_layers'] or hf['num_layers']}
  steps = {False: hf['encoder_sparse_step'], True: hf['decoder_sparse_step']}
  every = {cross: step if step in (0, 1, 2) else 1 for cross, step in steps.items()}
  dense = sorted({i for cross in (False, True) for i in range(layers[cross])
                  if every[cross] and (i + 1) % every[cross] == 0
                  and not switch_sparse(steps[cross], i)})
  for cross in (False, True):
    moejax = [every[cross] > 0 and (i + 1) % every[cross] == 0 and i not in dense
              for i in range(layers[cross])]
    if moejax != [switch_sparse(steps[cross], i) for i in range(layers[cross])]:
      raise InputError(f'switch_transformers checkpoint: encoder_sparse_step={steps[False]} with '
                       f'decoder_sparse_step={steps[True]} is not supported (the two stacks\' '
                       'dense blocks differ)')
  return dict(moe_every=every[False], decoder_moe_every=every[True], dense_layers=tuple(dense))


def _switch_steps(hf: dict) -> dict:
  """config.json with both `*_sparse_step` fields, as transformers derives them when absent."""
  decoder_layers = hf.get('num_decoder_layers') or hf['num_layers']
  derived = {}
  for stack, layers in (('encoder', hf['num_layers']), ('decoder', decoder_layers)):
    sparse = hf[f'num_sparse_{stack}_layers']
    derived[f'{stack}_sparse_step'] = layers // sparse if sparse > 0 else layers
  given = {k: v for k, v in hf.items() if v is not None}  # a null step: derived, as absent
  return {**hf, **derived, **given, 'num_decoder_layers': decoder_layers}


def _switch_config(hf: dict) -> ModelConfig:
  """Switch Transformers: T5 v1.0 (unscaled attention logits, a relative position bias in each
  stack, ReLU FFNs, T5's RMSNorm, the output tied to the embedding), sparse FFNs where
  `switch_sparse` puts them, top-1, a fixed expert capacity per sequence."""
  hf = _switch_steps(hf)
  if hf['router_dtype'] not in ('float32', 'bfloat16'):
    raise InputError(f'switch_transformers checkpoint: router_dtype={hf["router_dtype"]!r} is '
                     "not supported (only 'float32' or 'bfloat16')")
  heads, width = hf['num_heads'], hf['d_model']
  return ModelConfig(
      **_switch_layout(hf), num_decoder_layers=(None if hf['num_decoder_layers'] == hf['num_layers']
                                                else hf['num_decoder_layers']),
      vocab_size=hf['vocab_size'], kind='encoder_decoder', num_layers=hf['num_layers'],
      model_dim=width, num_heads=heads,
      head_dim=None if hf['d_kv'] * heads == width else hf['d_kv'], ffn_dim=hf['d_ff'],
      activation='relu', positions='relative',
      relative_buckets=hf['relative_attention_num_buckets'],
      relative_max_distance=hf['relative_attention_max_distance'],
      norm_eps=float(hf['layer_norm_epsilon']), scaled_attention=False,
      tie_embeddings=hf['tie_word_embeddings'], decoder_start_id=hf['decoder_start_token_id'],
      num_experts=hf['num_experts'], num_selected_experts=1,
      expert_capacity=hf['expert_capacity'], router_bias=hf['router_bias'],
      jitter_noise=float(hf['router_jitter_noise']), router_dtype=hf['router_dtype'])


def _hub_common(config: ModelConfig) -> dict[str, Any]:
  """The decoders' shared config.json fields; head_dim only when it is not D / H (a null one
  breaks transformers 4.57.6's Qwen2-MoE, which reads it wherever the field is)."""
  head_dim = {} if config.head_dim is None else dict(head_dim=config.head_dim)
  return dict(vocab_size=config.vocab_size, hidden_size=config.model_dim,
              num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
              num_key_value_heads=config.kv_heads, **head_dim,
              rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps, hidden_act='silu',
              tie_word_embeddings=False, num_experts_per_tok=config.num_selected_experts,
              bos_token_id=config.decoder_start_id)  # what the decoder reads first


def _switch_hub_step(config: ModelConfig, cross: bool) -> int:
  """The reference's `*_sparse_step` that makes a stack's blocks sparse where moejax's are."""
  layers = config.stack_layers(cross)
  sparse = [config.is_sparse(i, cross) for i in range(layers)]
  for step in range(layers + 1):
    if sparse == [switch_sparse(step, i) for i in range(layers)]:
      return step
  raise InputError(f'no switch_transformers sparse step puts the sparse blocks where this '
                   f'model has them ({"decoder" if cross else "encoder"}: {sparse})')


def _switch_hub_config(config: ModelConfig) -> dict[str, Any]:
  count = lambda cross: sum(config.is_sparse(i, cross) for i in range(config.stack_layers(cross)))
  return dict(architectures=['SwitchTransformersForConditionalGeneration'],
              vocab_size=config.vocab_size, d_model=config.model_dim,
              d_kv=config.attention_head_dim, d_ff=config.ffn_dim, num_layers=config.num_layers,
              num_decoder_layers=config.stack_layers(True), num_heads=config.num_heads,
              num_sparse_encoder_layers=count(False), num_sparse_decoder_layers=count(True),
              encoder_sparse_step=_switch_hub_step(config, False),
              decoder_sparse_step=_switch_hub_step(config, True), router_dtype=config.router_dtype,
              num_experts=config.num_experts, expert_capacity=config.expert_capacity,
              relative_attention_num_buckets=config.relative_buckets,
              relative_attention_max_distance=config.relative_max_distance,
              layer_norm_epsilon=config.norm_eps, router_jitter_noise=config.jitter_noise,
              router_bias=config.router_bias, dense_act_fn='relu',
              tie_word_embeddings=config.tie_embeddings, is_encoder_decoder=True,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=config.decoder_start_id)


def _swiglu_decoder(prefix: str, names: tuple[str, str, str]):
  """A decoder family whose sparse FFN is a router 'gate' and experts.{e}.<names> under the
  layer's `prefix`."""
  names = tuple(f'experts.{{e}}.{name}' for name in names)
  return lambda config: decoder_tensors(
      config, lambda hub, block: _experts(config, f'{hub}.{prefix}', block, names, 'gate'))


# The defaults of transformers 4.57.6's config classes for the fields moejax reads (a file may
# leave them out: OLMoE-1B-7B-0924 has no rms_norm_eps).
_DECODER_DEFAULTS = dict(head_dim=None, hidden_act='silu', tie_word_embeddings=False,
                         rope_scaling=None, attention_dropout=0.0)
MIXTRAL = Family(
    'mixtral', _mixtral_config, _swiglu_decoder('block_sparse_moe', ('w1', 'w3', 'w2')),
    lambda config: dict(_hub_common(config), architectures=['MixtralForCausalLM'],
                        intermediate_size=config.ffn_dim, num_local_experts=config.num_experts,
                        router_jitter_noise=config.jitter_noise),
    implemented=(*DECODER_IMPLEMENTED, 'head_dim', 'intermediate_size', 'num_local_experts',
                 'router_jitter_noise'),
    accepted=(),
    refused=dict(DECODER_REFUSED, sliding_window=None),
    defaults=dict(_DECODER_DEFAULTS, vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, rope_theta=1e6,
                  sliding_window=None, num_experts_per_tok=2, num_local_experts=8,
                  router_jitter_noise=0.0))
OLMOE = Family(
    'olmoe', _olmoe_config, _swiglu_decoder('mlp', ('gate_proj', 'up_proj', 'down_proj')),
    lambda config: dict(_hub_common(config), architectures=['OlmoeForCausalLM'],
                        intermediate_size=config.ffn_dim, num_experts=config.num_experts,
                        norm_topk_prob=config.normalize_weights),
    implemented=(*DECODER_IMPLEMENTED, 'intermediate_size', 'num_experts', 'norm_topk_prob'),
    accepted=(),
    refused=dict(DECODER_REFUSED, attention_bias=False, clip_qkv=None),
    defaults=dict(_DECODER_DEFAULTS, vocab_size=50304, hidden_size=2048, intermediate_size=2048,
                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=None,
                  rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=50279, rope_theta=1e4,
                  attention_bias=False, clip_qkv=None, num_experts_per_tok=8, num_experts=64,
                  norm_topk_prob=False))
QWEN2_MOE = Family(
    'qwen2_moe', _qwen_config,
    lambda config: decoder_tensors(config, functools.partial(_qwen_moe, config)),
    lambda config: dict(_hub_common(config), architectures=['Qwen2MoeForCausalLM'],
                        intermediate_size=config.dense_width, moe_intermediate_size=config.ffn_dim,
                        shared_expert_intermediate_size=config.num_shared_experts * config.ffn_dim,
                        num_experts=config.num_experts, decoder_sparse_step=config.moe_every,
                        mlp_only_layers=list(config.dense_layers),
                        norm_topk_prob=config.normalize_weights, qkv_bias=config.attention_bias),
    implemented=(*DECODER_IMPLEMENTED, 'intermediate_size', 'decoder_sparse_step',
                 'moe_intermediate_size', 'shared_expert_intermediate_size', 'num_experts',
                 'norm_topk_prob', 'mlp_only_layers', 'qkv_bias'),
    # The window is off unless use_sliding_window (refused), whatever its size and layers.
    accepted=('sliding_window', 'max_window_layers'),
    refused=dict(DECODER_REFUSED, use_sliding_window=False),
    defaults=dict(_DECODER_DEFAULTS, vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, rope_theta=1e4,
                  use_sliding_window=False, decoder_sparse_step=1, moe_intermediate_size=1408,
                  shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60,
                  norm_topk_prob=False, mlp_only_layers=[], qkv_bias=True))
SWITCH = Family(
    'switch_transformers', _switch_config, switch_tensors, _switch_hub_config,
    implemented=('vocab_size', 'd_model', 'd_kv', 'd_ff', 'expert_capacity', 'num_layers',
                 'num_sparse_encoder_layers', 'num_decoder_layers', 'num_sparse_decoder_layers',
                 'encoder_sparse_step', 'decoder_sparse_step', 'num_heads', 'num_experts',
                 'router_bias', 'router_jitter_noise', 'router_dtype',
                 'relative_attention_num_buckets', 'relative_attention_max_distance',
                 'layer_norm_epsilon', 'tie_word_embeddings', 'decoder_start_token_id'),
    # dropout_rate: training only (moejax fine-tunes with its own model.dropout_rate);
    # router_ignore_padding_tokens: read by no code of 4.57.6 (moejax never routes padding);
    # add_router_probs: an output; the eos id is the tokenizer's.
    # is_full_sparse: a T5X setting that 4.57.6 does not read.
    accepted=('dropout_rate', 'router_z_loss_coef', 'initializer_factor',
              'router_ignore_padding_tokens', 'add_router_probs', 'eos_token_id',
              'is_full_sparse'),
    refused=dict(dense_act_fn='relu', is_encoder_decoder=True, is_gated_act=False,
                 feed_forward_proj='relu', router_type='tokens_masked', num_selected_experts=1),
    defaults=dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, expert_capacity=64,
                  num_layers=12, num_sparse_encoder_layers=3,
                  num_decoder_layers=12,  # 4.57.6's, whatever num_layers is (null: num_layers)
                  num_sparse_decoder_layers=3, num_heads=12, num_experts=8, router_bias=False,
                  router_jitter_noise=0.01, router_dtype='float32',
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  layer_norm_epsilon=1e-6, tie_word_embeddings=True, decoder_start_token_id=0))
FAMILIES = {family.model_type: family for family in (MIXTRAL, OLMOE, QWEN2_MOE, SWITCH)}


def register(family: Family) -> None:
  """Add a family defined in a module of its own (`moejax.convert.qwen3`, ...: they build on
  this module's tables, so it cannot import them) to FAMILIES; `moejax.convert` registers each."""
  FAMILIES[family.model_type] = family


def hub_model_type(directory: str) -> str:
  """The family (config.json's `model_type`) of the hub checkpoint in `directory`; InputError
  when moejax does not import it."""
  return _hub_config(directory)['model_type']


def _hub_config(directory: str) -> dict:
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    raise InputError(f'no {path}: not a Hugging Face hub directory')
  with open(path) as f:
    hf = json.load(f)
  if hf.get('model_type') not in FAMILIES:
    raise InputError(f'{path}: model_type {hf.get("model_type")!r} is not one moejax imports '
                     f'({", ".join(FAMILIES)})')
  return hf


def from_hf(directory: str) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of the hub checkpoint in `directory`, as NumPy arrays in the dtypes
  the model creates: `param_dtype` is the checkpoint's (`checkpoint_dtype`), the routers'
  params float32. A checkpoint with state besides its params (DeepSeek-V3's correction
  biases): `from_hf_variables`."""
  config, variables = from_hf_variables(directory)
  return config, variables['params']


def from_hf_variables(directory: str) -> tuple[ModelConfig, dict]:
  """(ModelConfig, variables) of the hub checkpoint in `directory`: {'params': ...} as
  `from_hf` gives them, and the STATE_COLLECTIONS it fills (float32), which the layout names
  first in a path."""
  hf = _hub_config(directory)
  family = FAMILIES[hf['model_type']]
  config = family.read(hf)
  checkpoint = family.open(directory)
  layout = family.tensors(config)
  for tensor in layout:
    missing = [name for name in tensor.names if name not in checkpoint]
    if missing:
      raise InputError(f'{directory}: no tensor {missing[0]} (a {family.model_type} checkpoint '
                       f'of {config.num_layers} layers needs it)')
  config = dataclasses.replace(config, param_dtype=checkpoint_dtype(checkpoint, layout))
  variables: dict = {'params': {}}
  for tensor in layout:
    for path, array in tensor.params([checkpoint.tensor(name) for name in tensor.names]).items():
      _set(variables, path if path[0] in STATE_COLLECTIONS else ('params', *path),
           array.astype(_param_dtype(config, path), copy=False))
  return config, variables


def checkpoint_dtype(checkpoint: Checkpoint, layout: list[Tensor]) -> str:
  """The `param_dtype` of a checkpoint: its expert weights' dtype (the bulk of an MoE), read from
  the tensors, not from config.json's `torch_dtype` (a label the tensors may not match).
  float32 and bfloat16 are kept; float16 and float64 become float32 (exact for float16; bfloat16
  would drop 3 of its mantissa bits). A checkpoint mixing dtypes takes its experts' and every
  other tensor is cast to it (a float32 norm scale of a bfloat16 checkpoint is rounded)."""
  experts = next((t for t in layout if t.kind == 'experts'), layout[0])
  dtype = np.dtype(checkpoint.tensor(experts.names[0]).dtype)
  return 'bfloat16' if dtype == np.dtype(ml_dtypes.bfloat16) else 'float32'


def _param_dtype(config: ModelConfig, path: tuple[str, ...]) -> np.dtype:
  """The dtype the model creates the param at `path` in: float32 for the routers'
  (`moejax.routers`) and the state collections', `config.param_dtype` for every other."""
  float32 = 'router' in path or path[0] in STATE_COLLECTIONS
  return np.dtype(np.float32 if float32 else config.storage_dtype)


def to_hf(config: ModelConfig, params: dict, directory: str, model_type: str,
          max_shard_bytes: int | None = None, tokenizer_dir: str | None = None,
          state: dict | None = None) -> list[str]:
  """Write `params` of `config` into `directory` as a hub checkpoint of the family `model_type`
  ('mixtral', 'olmoe', ...); the files written. The tensors go in the family's order into
  model.safetensors, or with `max_shard_bytes` into shards of at most that many bytes (a larger
  tensor has one of its own) named in model.safetensors.index.json, as transformers writes them;
  one at a time, so beside the params only one param's host copy and one hub tensor are held.
  With `tokenizer_dir`, its tokenizer files are copied too (`copy_tokenizer`); config.json
  comes last. Every tensor is written in the dtype of the expert weights (the params' dtype but
  the routers', which are float32: a bfloat16 model's router is rounded to bfloat16, as hub
  checkpoints store it); config.json's `torch_dtype` says which. InputError when `params` do
  not fit the family's layout or `directory` already holds a checkpoint; ConfigError naming a
  model field the family cannot hold (`_check_config`). `state`: the STATE_COLLECTIONS the
  family's checkpoints hold (DeepSeek-V3's 'balancing_bias_state'), by collection name."""
  params = {**params, **(state or {})}  # the layout names a state collection first in a path
  if model_type not in FAMILIES:
    raise InputError(f'model_type {model_type!r} is not one moejax exports '
                     f'({", ".join(FAMILIES)})')
  family = FAMILIES[model_type]
  _check_config(family, config)
  layout = family.tensors(config)
  _check_params(layout, params, model_type)
  _check_no_checkpoint(directory)
  os.makedirs(directory, exist_ok=True)
  if tokenizer_dir is not None and copy_tokenizer(tokenizer_dir, directory) is None:
    raise InputError(f'{tokenizer_dir} holds no tokenizer ({", ".join(HUB_TOKENIZER_FILES)})')
  experts = next((t for t in layout if t.kind == 'experts'), layout[0])
  dtype = np.dtype(_get(params, experts.path).dtype)
  shapes = {name: (shape, dtype) for t in layout for name, shape in zip(t.names, t.hub_shapes())}
  files = write_checkpoint(directory, _hub_tensors(layout, params, dtype), shapes,
                           max_shard_bytes, {'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:  # the tokenizer's, replaced
    json.dump(dict(family.hub_config(config), model_type=family.model_type,
                   torch_dtype=dtype.name), f, indent=2)
  return [*files, 'config.json']


def copy_tokenizer(source: str, directory: str) -> str | None:
  """Copy a hub directory's tokenizer files (tokenizer.json, spiece.model or tokenizer.model,
  and the configs naming its special tokens) into `directory`, which it returns; None, copying
  nothing, when `source` has no tokenizer."""
  if not any(os.path.exists(os.path.join(source, f)) for f in HUB_TOKENIZER_FILES):
    return None
  os.makedirs(directory, exist_ok=True)
  for name in (*HUB_TOKENIZER_FILES, *HUB_TOKENIZER_CONFIGS):
    if os.path.exists(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
  return directory


# ModelConfig fields an export leaves behind: how moejax stores, trains or runs a model, not
# what the family's model computes from its tensors (it routes without capacity, or with
# Switch's expert_capacity, in the dtype it is loaded in).
RUN_FIELDS = ('dtype', 'param_dtype', 'scan_layers', 'remat', 'dropout_rate', 'expert_dropout',
              'jitter_noise', 'dispatch', 'block_size', 'group_size', 'train_capacity_factor',
              'eval_capacity_factor', 'min_expert_capacity', 'load_balancing_loss_scale',
              'init_scale', 'router_init_scale')


def _check_config(family: Family, config: ModelConfig) -> None:
  """ConfigError naming the first model field whose value the family's checkpoint cannot hold:
  its config.json, read back, would make another model (OLMoE's qk_norm in a Mixtral file)."""
  try:
    expected = _computed(family.read(family.hub_config(config)))
  except ConfigError as error:  # Qwen2-MoE's without a shared expert, say
    raise InputError(f'no {family.model_type} checkpoint holds this model: {error}') from None
  for field, value in _computed(config).items():
    if value != expected[field]:
      shown = '' if value == getattr(config, field) else f' (here {value!r})'
      raise ConfigError(field, getattr(config, field),
                        f'{family.model_type} checkpoints hold {expected[field]!r}{shown}',
                        'model')


def _computed(config: ModelConfig) -> dict[str, Any]:
  """The fields of `config` that decide what its model computes (RUN_FIELDS left out), a None
  that stands for a value resolved, and the layout as which blocks of each stack are sparse
  (under moe_every)."""
  stacks = (False, True) if config.kind == 'encoder_decoder' else (False,)
  sparse = tuple(tuple(config.is_sparse(i, cross) for i in range(config.stack_layers(cross)))
                 for cross in stacks)
  fields = {k: v for k, v in config.to_dict().items()
            if k not in (*RUN_FIELDS, 'decoder_moe_every', 'dense_layers')}
  return dict(fields, head_dim=config.attention_head_dim, num_kv_heads=config.kv_heads,
              positions=config.position_kind, moe_every=sparse,
              num_decoder_layers=config.stack_layers(True) if len(stacks) == 2 else None,
              dense_ffn_dim=config.dense_width if not all(map(all, sparse)) else None)


def _check_params(layout: list[Tensor], params: dict, model_type: str) -> None:
  """InputError naming the first param missing from `params`, left over, or of another shape
  than the family's layout of the config gives it."""
  found = dict(_leaves(params))
  for path, shape in (item for tensor in layout for item in tensor.param_shapes().items()):
    name = '/'.join(path)
    if path not in found:
      raise InputError(f'{model_type} export: the params have no {name}, which '
                       f'{model_type} checkpoints of this config hold')
    if tuple(found.pop(path).shape) != shape:
      raise InputError(f'{model_type} export: param {name} is not {list(shape)}, its '
                       f'shape in {model_type} checkpoints of this config')
  if found:
    raise InputError(f'{model_type} export: param {"/".join(next(iter(found)))} has no place in '
                     f'{model_type} checkpoints')


def _check_no_checkpoint(directory: str) -> None:
  """InputError when `directory` holds hub weights that an export would mix with its own."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  held = [n for n in names if n in (SINGLE, INDEX)
          or (n.startswith('model-') and n.endswith('.safetensors'))]
  if held:
    raise InputError(f'{directory} already holds a checkpoint ({sorted(held)[0]}); export into '
                     'an empty directory')


def _hub_tensors(layout: list[Tensor], params: dict,
                 dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
  param = lambda path: np.asarray(_get(params, path), dtype)
  for tensor in layout:
    yield from zip(tensor.names, tensor.hub_arrays(param))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaves(value, (*prefix, key))
    else:
      yield (*prefix, key), value
