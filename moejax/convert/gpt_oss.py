"""gpt-oss checkpoints (gpt-oss-20b, -120b): attention with biases on all four projections and a
learned sink per head, sliding-window and full layers as `layer_types` says, YaRN positions; a
router with a bias whose top-K logits are softmaxed; experts with biases and the clamped SwiGLU
(x sigmoid(1.702 x) of the gate clamped above at 7, times the linear half clamped to [-7, 7]
plus 1). The published expert weights are MXFP4 (`dequantize_mxfp4`), read dequantized.

The hub's experts are one tensor per layer, not one per expert: gate_up_proj [E, D, 2F] with the
gate (moejax's wi) and linear (wi_gate) columns interleaved, and down_proj [E, F, D] (`Tensor`
kind 'same': already moejax's [E, in, out] layout)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from moejax.convert.deepseek import _yarn_fields
from moejax.convert.hf import (DECODER_IMPLEMENTED, Family, Tensor, _attention, _block,
                               _decoder_fields, _hub_common)
from moejax.convert.safetensors import Checkpoint
from moejax.errors import InputError
from moejax.models import ModelConfig

# MXFP4's 4-bit codes (E2M1: sign, 2 exponent bits, 1 mantissa bit), code i at index i.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
SWIGLU_LIMIT = 7.0  # transformers 4.57.6's GptOssExperts clamps at 7.0 whatever swiglu_limit says


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """A weight [E, IN, OUT] (float32, exact) from its MXFP4 blocks [E, OUT, G, 16] (uint8: two
  codes a byte, the low nibble first, 32 inputs a block) and scales [E, OUT, G] (uint8: a power
  of two, biased by 127, per block), as transformers' `convert_moe_packed_tensors` reads them.
  Bytes 0x21 0x0F ... of a block of scale 128 are inputs 0.5, 1.0, -6.0, 0.0, ... times 2."""
  codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # Shape: [E, OUT, G, 16, 2]
  values = FP4_VALUES[codes].reshape(*scales.shape, -1)  # Shape: [E, OUT, G, 32]
  values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
  return values.reshape(*scales.shape[:2], -1).transpose(0, 2, 1)  # Shape: [E, IN, OUT]


class Mxfp4Checkpoint(Checkpoint):
  """A hub directory whose tensors X may be stored as MXFP4 X_blocks and X_scales (gpt-oss's
  quantization_config quant_method 'mxfp4'): such an X reads dequantized."""

  def __contains__(self, name: str) -> bool:
    return super().__contains__(name) or super().__contains__(f'{name}_blocks')

  def names(self) -> list[str]:
    parts = ('_blocks', '_scales')
    return sorted({name[:-len('_blocks')] if name.endswith(parts) else name
                   for name in super().names()})

  def tensor(self, name: str) -> np.ndarray:
    if super().__contains__(name):
      return super().tensor(name)
    return dequantize_mxfp4(super().tensor(f'{name}_blocks'), super().tensor(f'{name}_scales'))


@dataclasses.dataclass(frozen=True)
class Interleaved(Tensor):
  """Two params of shape `shape` in one hub tensor whose last axis alternates them: `path` the
  even columns, `odd_path` the odd ones (gpt-oss's gate_up_proj [E, D, 2F] and its bias)."""
  odd_path: tuple[str, ...] = ()

  def params(self, arrays: list[np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    both = arrays[0]
    return {self.path: np.ascontiguousarray(both[..., 0::2]),
            self.odd_path: np.ascontiguousarray(both[..., 1::2])}

  def param_shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {self.path: self.shape, self.odd_path: self.shape}

  def hub_shapes(self) -> list[tuple[int, ...]]:
    return [(*self.shape[:-1], 2 * self.shape[-1])]

  def hub_arrays(self, param: Callable[[tuple[str, ...]], np.ndarray]) -> Iterator[np.ndarray]:
    even, odd = param(self.path), param(self.odd_path)
    both = np.empty((*even.shape[:-1], 2 * even.shape[-1]), even.dtype)
    both[..., 0::2], both[..., 1::2] = even, odd
    return iter([both])


def _moe(config: ModelConfig, prefix: str, block: tuple) -> list[Tensor]:
  """The router (weight and bias) and the experts of layer `prefix`'s mlp."""
  e, d, f = config.num_experts, config.model_dim, config.ffn_dim
  moe, hub = (*block, 'moe'), f'{prefix}.mlp'
  experts = (*moe, 'experts')
  return [Tensor((*moe, 'router', 'dense', 'kernel'), (f'{hub}.router.weight',), (d, e), 'linear'),
          Tensor((*moe, 'router', 'dense', 'bias'), (f'{hub}.router.bias',), (e,)),
          Interleaved((*experts, 'wi'), (f'{hub}.experts.gate_up_proj',), (e, d, f), 'same',
                      odd_path=(*experts, 'wi_gate')),
          Interleaved((*experts, 'bi'), (f'{hub}.experts.gate_up_proj_bias',), (e, f), 'same',
                      odd_path=(*experts, 'bi_gate')),
          Tensor((*experts, 'wo'), (f'{hub}.experts.down_proj',), (e, f, d), 'same'),
          Tensor((*experts, 'bo'), (f'{hub}.experts.down_proj_bias',), (e, d), 'same')]


def _tensors(config: ModelConfig) -> list[Tensor]:
  d = config.model_dim
  out = [Tensor(('embed', 'embedding'), ('model.embed_tokens.weight',), (config.vocab_size, d),
                'same')]
  for layer in range(config.num_layers):
    block, prefix = _block(config, layer), f'model.layers.{layer}'
    attention = (*block, 'attention')
    out += [Tensor((*block, 'pre_attention_norm', 'scale'),
                   (f'{prefix}.input_layernorm.weight',), (d,)),
            *_attention(attention, f'{prefix}.self_attn', config),
            Tensor((*attention, 'sinks'), (f'{prefix}.self_attn.sinks',), (config.num_heads,)),
            Tensor((*block, 'pre_ffn_norm', 'scale'),
                   (f'{prefix}.post_attention_layernorm.weight',), (d,)),
            *_moe(config, prefix, block)]
  return out + [Tensor(('decoder', 'final_norm', 'scale'), ('model.norm.weight',), (d,)),
                Tensor(('logits', 'kernel'), ('lm_head.weight',), (d, config.vocab_size),
                       'linear')]


LAYER_TYPES = ('sliding_attention', 'full_attention')


def _window(hf: dict) -> dict:
  """sliding_window and full_attention_layers from layer_types (None: sliding, full, sliding,
  ... as transformers 4.57.6 fills it in); no window when no layer slides."""
  layers = hf['num_hidden_layers']
  kinds = hf['layer_types'] or [LAYER_TYPES[i % 2] for i in range(layers)]
  if len(kinds) != layers or not set(kinds) <= set(LAYER_TYPES):
    raise InputError(f'gpt_oss checkpoint: layer_types={kinds!r} is not supported (one of '
                     f'{LAYER_TYPES} for each of the {layers} layers)')
  full = tuple(i for i, kind in enumerate(kinds) if kind == 'full_attention')
  if len(full) == layers:
    return dict(sliding_window=None, full_attention_layers=())
  return dict(sliding_window=hf['sliding_window'], full_attention_layers=full)


def _gpt_oss_config(hf: dict) -> ModelConfig:
  quantization = hf.get('quantization_config')
  if quantization is not None and quantization.get('quant_method') != 'mxfp4':
    raise InputError(f'gpt_oss checkpoint: quantization_config={quantization!r} is not '
                     "supported (only quant_method 'mxfp4', or none)")
  bias = hf.get('attention_bias', True)
  return ModelConfig(**{
      **_decoder_fields(hf), **_window(hf), **_yarn_fields(hf), 'ffn_dim': hf['intermediate_size'],
      'moe_every': 1, 'num_experts': hf['num_local_experts'], 'router_bias': True,
      'softmax_after_top_k': True, 'activation': 'quick_gelu', 'activation_limit': SWIGLU_LIMIT,
      'glu_linear_offset': 1.0, 'expert_bias': True, 'attention_bias': bias,
      'attention_out_bias': bias, 'attention_sinks': True})


def _gpt_oss_hub_config(config: ModelConfig) -> dict:
  kinds = [LAYER_TYPES[config.attention_window(i) is None] for i in range(config.num_layers)]
  scaling = None
  if config.yarn_factor is not None:
    scaling = dict(rope_type='yarn', factor=config.yarn_factor,
                   beta_fast=config.yarn_beta_fast, beta_slow=config.yarn_beta_slow,
                   original_max_position_embeddings=config.yarn_original_length,
                   truncate=config.yarn_truncate)
  return dict(_hub_common(config), architectures=['GptOssForCausalLM'],
              head_dim=config.attention_head_dim, intermediate_size=config.ffn_dim,
              num_local_experts=config.num_experts, attention_bias=config.attention_bias,
              layer_types=kinds, sliding_window=config.sliding_window, rope_scaling=scaling)


GPT_OSS = Family(
    'gpt_oss', _gpt_oss_config, _tensors, _gpt_oss_hub_config,
    implemented=(*DECODER_IMPLEMENTED, 'head_dim', 'intermediate_size', 'num_local_experts',
                 'attention_bias', 'layer_types', 'sliding_window', 'rope_scaling'),
    # hidden_act, experts_per_token, initial_context_length, swiglu_limit: read by no code of
    # transformers 4.57.6 (its experts' activation and clamp are constants); the
    # quantization_config only says how the expert weights are stored (read dequantized).
    accepted=('hidden_act', 'experts_per_token', 'initial_context_length', 'swiglu_limit',
              'quantization_config'),
    refused=dict(tie_word_embeddings=False, attention_dropout=0.0),
    defaults=dict(head_dim=64, vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                  num_hidden_layers=36, num_local_experts=128, num_attention_heads=64,
                  num_key_value_heads=8, sliding_window=128, rope_theta=150000.0,
                  tie_word_embeddings=False, rms_norm_eps=1e-5, attention_dropout=0.0,
                  num_experts_per_tok=4, layer_types=None, bos_token_id=None, eos_token_id=None,
                  rope_scaling={'rope_type': 'yarn', 'factor': 32.0, 'beta_fast': 32.0,
                                'beta_slow': 1.0, 'truncate': False,
                                'original_max_position_embeddings': 4096}),
    open=Mxfp4Checkpoint)
