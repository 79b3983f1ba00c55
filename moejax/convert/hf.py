"""Hugging Face MoE checkpoints in and out: Mixtral, OLMoE and Qwen2-MoE (Qwen1.5-MoE) decoders.

`from_hf(directory)` reads a hub directory (config.json, model.safetensors or its shards) into a
`ModelConfig` and moejax params; `to_hf(config, params, directory)` writes them back in the
family's layout. Both go one tensor at a time (`moejax.convert.safetensors`): the input is
memory-mapped and each moejax array is built from its own input tensors only.

Each family is a table: which config fields become which `ModelConfig` fields (the settings a
family fixes, such as SwiGLU experts, rotary positions and dropless top-K routing, included), and
for every moejax parameter the hub tensors it is made of (`Tensor`). The mapping is a reshape or a
transpose (and a stack over experts), so import -> export -> import is bit-exact.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from moejax.convert.safetensors import Checkpoint, write_safetensors
from moejax.errors import InputError
from moejax.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One moejax parameter and the hub tensors it is made of.

  kind 'same': the hub tensor as it is (the embedding); 'flat': a 1-D hub tensor reshaped (norm
  scales, biases; a scale [H, A] of the heads' q-norm is [H * A] there); 'linear': a torch
  Linear weight [out, in] transposed, then reshaped to `shape` whose first `in_axes` axes are the
  input's; 'experts': one Linear weight per expert, each transposed, stacked [E, in, out].
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
    else:
      array = (arrays[0].T if self.kind == 'linear' else arrays[0]).reshape(self.shape)
    return np.require(array, requirements=['C', 'O'])

  def hub_shapes(self) -> list[tuple[int, ...]]:
    if self.kind == 'experts':
      return [self.shape[:0:-1]] * self.shape[0]
    if self.kind == 'linear':
      inputs = int(np.prod(self.shape[:self.in_axes]))
      return [(int(np.prod(self.shape)) // inputs, inputs)]
    return [self.shape if self.kind == 'same' else (int(np.prod(self.shape)),)]

  def to_hub(self, array: np.ndarray) -> list[np.ndarray]:
    if self.kind == 'experts':
      return [np.ascontiguousarray(a.T) for a in array]
    if self.kind == 'linear':
      return [np.ascontiguousarray(array.reshape(self.hub_shapes()[0][::-1]).T)]
    return [array.reshape(self.hub_shapes()[0])]


@dataclasses.dataclass(frozen=True)
class Family:
  """How one hub `model_type` maps onto moejax."""
  model_type: str
  model_config: Callable[[dict], ModelConfig]  # hub config.json -> ModelConfig
  moe_tensors: Callable[[ModelConfig, str, tuple], list[Tensor]]  # (config, prefix, block path)
  hub_config: Callable[[ModelConfig], dict]  # the family's config.json fields from a ModelConfig


def _refuse(hf: dict, **unsupported: Any) -> None:
  """InputError naming the first hub setting moejax does not implement (its value is not the
  supported one)."""
  for field, supported in unsupported.items():
    if hf.get(field, supported) != supported:
      raise InputError(f'{hf.get("model_type")} checkpoint: {field}={hf[field]!r} is not '
                       f'supported (only {supported!r})')


def _decoder_fields(hf: dict) -> dict[str, Any]:
  """ModelConfig fields every family here shares: a pre-norm RMSNorm decoder with rotary
  positions, SwiGLU experts, an untied output layer, float32 routers, dropless routing."""
  _refuse(hf, tie_word_embeddings=False, rope_scaling=None, hidden_act='silu',
          sliding_window=None, use_sliding_window=False)
  heads, width = hf['num_attention_heads'], hf['hidden_size']
  head_dim = hf.get('head_dim')  # None (or D / H) in most: ModelConfig's None
  return dict(vocab_size=hf['vocab_size'], kind='decoder', num_layers=hf['num_hidden_layers'],
              model_dim=width, num_heads=heads,
              head_dim=None if head_dim in (None, width // heads) else head_dim,
              num_kv_heads=hf.get('num_key_value_heads') or heads, activation='silu', glu=True,
              positions='rotary', rope_theta=float(hf.get('rope_theta', 10_000.0)),
              norm_eps=float(hf['rms_norm_eps']), num_selected_experts=hf['num_experts_per_tok'],
              train_capacity_factor=None, eval_capacity_factor=None, router_dtype='float32')


def _block(config: ModelConfig, layer: int) -> tuple[str, ...]:
  """The params path of block `layer` of the decoder stack (unscanned)."""
  units = config.num_layers // config.period
  if layer >= units * config.period:
    return ('decoder', f'block_{layer}')
  return ('decoder', f'unit_{layer // config.period}', f'block_{layer % config.period}')


def _experts(config: ModelConfig, prefix: str, block: tuple, names: tuple[str, str, str],
             router: str) -> list[Tensor]:
  """The router and the SwiGLU experts (`names`: the gated, the up and the down projection)."""
  e, d, f = config.num_experts, config.model_dim, config.ffn_dim
  per_expert = lambda name: tuple(f'{prefix}.experts.{i}.{name}.weight' for i in range(e))
  moe = (*block, 'moe')
  return [Tensor((*moe, 'router', 'dense', 'kernel'), (f'{prefix}.{router}.weight',), (d, e),
                 'linear'),
          Tensor((*moe, 'experts', 'wi'), per_expert(names[0]), (e, d, f), 'experts'),
          Tensor((*moe, 'experts', 'wi_gate'), per_expert(names[1]), (e, d, f), 'experts'),
          Tensor((*moe, 'experts', 'wo'), per_expert(names[2]), (e, f, d), 'experts')]


def tensors(family: Family, config: ModelConfig) -> list[Tensor]:
  """Every moejax parameter of `config` and the hub tensors it is made of, in hub order."""
  d, h, kv, a = config.model_dim, config.num_heads, config.kv_heads, config.attention_head_dim
  out = [Tensor(('embed', 'embedding'), ('model.embed_tokens.weight',), (config.vocab_size, d),
                'same')]
  for layer in range(config.num_layers):
    block, prefix = _block(config, layer), f'model.layers.{layer}'
    attention, hub = (*block, 'attention'), f'{prefix}.self_attn'
    out.append(Tensor((*block, 'pre_attention_norm', 'scale'),
                      (f'{prefix}.input_layernorm.weight',), (d,)))
    for name, hub_name, heads in (('query', 'q_proj', h), ('key', 'k_proj', kv),
                                  ('value', 'v_proj', kv)):
      out.append(Tensor((*attention, name, 'kernel'), (f'{hub}.{hub_name}.weight',),
                        (d, heads, a), 'linear'))
      if config.attention_bias:
        out.append(Tensor((*attention, name, 'bias'), (f'{hub}.{hub_name}.bias',), (heads, a)))
    if config.qk_norm:
      out += [Tensor((*attention, 'query_norm', 'scale'), (f'{hub}.q_norm.weight',), (h, a)),
              Tensor((*attention, 'key_norm', 'scale'), (f'{hub}.k_norm.weight',), (kv, a))]
    out.append(Tensor((*attention, 'out', 'kernel'), (f'{hub}.o_proj.weight',), (h, a, d),
                      'linear', in_axes=2))
    out.append(Tensor((*block, 'pre_ffn_norm', 'scale'),
                      (f'{prefix}.post_attention_layernorm.weight',), (d,)))
    if not config.is_sparse(layer):
      raise InputError(f'{family.model_type} checkpoint: layer {layer} has a dense FFN; only '
                       'checkpoints whose every layer is sparse are supported')
    out += family.moe_tensors(config, prefix, block)
  out += [Tensor(('decoder', 'final_norm', 'scale'), ('model.norm.weight',), (d,)),
          Tensor(('logits', 'kernel'), ('lm_head.weight',), (d, config.vocab_size), 'linear')]
  return out


def _mixtral_config(hf: dict) -> ModelConfig:
  return ModelConfig(**_decoder_fields(hf), ffn_dim=hf['intermediate_size'], moe_every=1,
                     num_experts=hf['num_local_experts'], normalize_weights=True)


def _olmoe_config(hf: dict) -> ModelConfig:
  _refuse(hf, clip_qkv=None, attention_bias=False)
  return ModelConfig(**_decoder_fields(hf), ffn_dim=hf['intermediate_size'], moe_every=1,
                     num_experts=hf['num_experts'], normalize_weights=hf['norm_topk_prob'],
                     qk_norm=True)


def _hub_common(config: ModelConfig) -> dict[str, Any]:
  return dict(vocab_size=config.vocab_size, hidden_size=config.model_dim,
              num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
              num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
              rope_theta=config.rope_theta, rms_norm_eps=config.norm_eps, hidden_act='silu',
              tie_word_embeddings=False, num_experts_per_tok=config.num_selected_experts,
              torch_dtype='float32')


FAMILIES = {family.model_type: family for family in (
    Family('mixtral', _mixtral_config,
           lambda config, prefix, block: _experts(config, f'{prefix}.block_sparse_moe', block,
                                                  ('w1', 'w3', 'w2'), 'gate'),
           lambda config: dict(_hub_common(config), architectures=['MixtralForCausalLM'],
                               intermediate_size=config.ffn_dim,
                               num_local_experts=config.num_experts)),
    Family('olmoe', _olmoe_config,
           lambda config, prefix, block: _experts(config, f'{prefix}.mlp', block,
                                                  ('gate_proj', 'up_proj', 'down_proj'), 'gate'),
           lambda config: dict(_hub_common(config), architectures=['OlmoeForCausalLM'],
                               intermediate_size=config.ffn_dim, num_experts=config.num_experts,
                               norm_topk_prob=config.normalize_weights)),
)}


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
  """(ModelConfig, params) of the hub checkpoint in `directory`, as NumPy arrays."""
  hf = _hub_config(directory)
  family = FAMILIES[hf['model_type']]
  config = family.model_config(hf)
  checkpoint = Checkpoint(directory)
  params: dict = {}
  for tensor in tensors(family, config):
    missing = [name for name in tensor.names if name not in checkpoint]
    if missing:
      raise InputError(f'{directory}: no tensor {missing[0]} (a {family.model_type} checkpoint '
                       f'of {config.num_layers} layers needs it)')
    array = tensor.to_moejax([checkpoint.tensor(name) for name in tensor.names])
    _set(params, tensor.path, array)
  return config, params


def to_hf(config: ModelConfig, params: dict, directory: str, model_type: str) -> None:
  """Write `params` of `config` into `directory` as a hub checkpoint of the family `model_type`
  ('mixtral', 'olmoe', ...): config.json and model.safetensors."""
  family = FAMILIES[model_type]
  os.makedirs(directory, exist_ok=True)
  layout = tensors(family, config)
  shapes = {name: (shape, np.asarray(_get(params, t.path)).dtype)
            for t in layout for name, shape in zip(t.names, t.hub_shapes())}
  write_safetensors(os.path.join(directory, 'model.safetensors'), _hub_tensors(layout, params),
                    shapes, {'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(dict(family.hub_config(config), model_type=family.model_type), f, indent=2)


def _hub_tensors(layout: list[Tensor], params: dict) -> Iterator[tuple[str, np.ndarray]]:
  for tensor in layout:
    yield from zip(tensor.names, tensor.to_hub(np.asarray(_get(params, tensor.path))))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree
