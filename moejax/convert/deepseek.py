"""DeepSeek-V2 and -V3 checkpoints (DeepSeek-V2-Lite, -V2, -V3, -R1): multi-head latent
attention (`moejax.models.mla`) with YaRN positions, and DeepSeekMoE FFNs (many small
routed experts and always-on shared experts) in every block but the first `first_k_dense_replace`.

Routing, as transformers 4.57.6 computes it:
- deepseek_v2: softmax scores; top-k over all experts ('greedy', V2-Lite) or over the experts of
  each token's `topk_group` best groups, a group ranked by its best expert
  ('group_limited_greedy', V2); the weights are the top-k probabilities times
  `routed_scaling_factor`, never renormalized (4.57.6's V2 gate reads `norm_topk_prob` and does
  not use it; DeepSeek's own V2 code renormalizes when it is set).
- deepseek_v3: sigmoid scores; `e_score_correction_bias` added to choose only (moejax's balancing
  bias, which keeps updating when the import is fine-tuned, at DEEPSEEK_V3_BIAS_RATE); groups
  ranked by the sum of their two best; `norm_topk_prob`, then `routed_scaling_factor`. The
  experts of groups not kept score 0 in the top-k (4.57.6; DeepSeek's code: -inf,
  `unselected_group_fill`).

Rotary layout: DeepSeek's checkpoints pair adjacent dims of each rotary part (V2's complex
view; V3's `rope_interleave`, the only layout published), moejax pairs dim i with i + P/2.
Their models are the same up to a permutation of those dims in the query's and the key's
projections, which the import applies (the evens, then the odds) and the export undoes, bit for
bit.

FP8 weights (V3, R1, K2: e4m3 with a scale per 128 x 128 block) are dequantized into float32 on
import (`moejax.convert.fp8`). V3's multi-token-prediction layer (`num_nextn_predict_layers`, the
layers past `num_hidden_layers`) is left out, with a warning.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import numpy as np

from moejax.balancing import BIAS_COLLECTION
from moejax.convert.fp8 import Fp8Checkpoint
from moejax.convert.hf import (DECODER_IMPLEMENTED, Family, Tensor, _decoder_fields, _experts,
                               _hub_common, decoder_tensors)
from moejax.errors import InputError
from moejax.models import ModelConfig

# The rate an imported V3 correction bias moves at when fine-tuned: DeepSeek-V3's bias update
# speed for most of its pre-training (arXiv:2412.19437, section 4.2).
DEEPSEEK_V3_BIAS_RATE = 0.001


@dataclasses.dataclass(frozen=True)
class RopeRows(Tensor):
  """A 'linear' Tensor whose hub rows form `heads` blocks of `width` rows, each ending in a
  rotary part of `rope` rows in DeepSeek's interleaved order; moejax's order is its even rows,
  then its odd ones."""
  heads: int = 1
  width: int = 0
  rope: int = 0

  def _order(self) -> np.ndarray:
    """moejax row j is hub row order[j]."""
    pairs = np.concatenate([np.arange(0, self.rope, 2), np.arange(1, self.rope, 2)])
    head = np.concatenate([np.arange(self.width - self.rope), self.width - self.rope + pairs])
    return (np.arange(self.heads)[:, None] * self.width + head).reshape(-1)

  def to_moejax(self, arrays: list[np.ndarray]) -> np.ndarray:
    return super().to_moejax([arrays[0][self._order()]])

  def to_hub(self, array: np.ndarray):
    return iter([row[np.argsort(self._order())] for row in super().to_hub(array)])


def _mla(path: tuple, hub: str, config: ModelConfig) -> list[Tensor]:
  """Multi-head latent attention at `path` from the hub's `hub`.{q_proj | q_a_proj,
  q_a_layernorm, q_b_proj}, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj and o_proj."""
  d, h, r = config.model_dim, config.num_heads, config.kv_lora_rank
  n, p, u = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
  rope_rows = lambda path_, name, shape, heads, width: RopeRows(
      path_, (name,), shape, 'linear', heads=heads, width=width, rope=p)
  if config.q_lora_rank is None:
    out = [rope_rows((*path, 'query', 'kernel'), f'{hub}.q_proj.weight', (d, h, n + p), h, n + p)]
  else:
    q = config.q_lora_rank
    out = [Tensor((*path, 'query_down', 'kernel'), (f'{hub}.q_a_proj.weight',), (d, q), 'linear'),
           Tensor((*path, 'query_norm', 'scale'), (f'{hub}.q_a_layernorm.weight',), (q,)),
           rope_rows((*path, 'query_up', 'kernel'), f'{hub}.q_b_proj.weight', (q, h, n + p), h,
                     n + p)]
  return out + [
      rope_rows((*path, 'kv_down', 'kernel'), f'{hub}.kv_a_proj_with_mqa.weight', (d, r + p), 1,
                r + p),
      Tensor((*path, 'kv_norm', 'scale'), (f'{hub}.kv_a_layernorm.weight',), (r,)),
      Tensor((*path, 'kv_up', 'kernel'), (f'{hub}.kv_b_proj.weight',), (r, h, n + u), 'linear'),
      Tensor((*path, 'out', 'kernel'), (f'{hub}.o_proj.weight',), (h, u, d), 'linear', in_axes=2)]


def _deepseek_moe(config: ModelConfig, prefix: str, block: tuple) -> list[Tensor]:
  """The router 'gate', the routed experts, the shared experts cut into `num_shared_experts` of
  width F, and with balancing biases the correction bias (a state, not a param)."""
  s, d, f, hub = config.num_shared_experts, config.model_dim, config.ffn_dim, f'{prefix}.mlp'
  routed = ('experts.{e}.gate_proj', 'experts.{e}.up_proj', 'experts.{e}.down_proj')
  out = _experts(config, hub, block, routed, 'gate')
  if s:
    shared = (*block, 'moe', 'shared_experts')
    out += [Tensor((*shared, 'wi'), (f'{hub}.shared_experts.gate_proj.weight',), (s, d, f),
                   'shared'),
            Tensor((*shared, 'wi_gate'), (f'{hub}.shared_experts.up_proj.weight',), (s, d, f),
                   'shared'),
            Tensor((*shared, 'wo'), (f'{hub}.shared_experts.down_proj.weight',), (s, f, d),
                   'linear', in_axes=2)]
  if config.balancing_bias_rate > 0:
    out.append(Tensor((BIAS_COLLECTION, *block, 'moe', 'bias'),
                      (f'{hub}.gate.e_score_correction_bias',), (config.num_experts,)))
  return out


def deepseek_tensors(config: ModelConfig) -> list[Tensor]:
  return decoder_tensors(config, functools.partial(_deepseek_moe, config), _mla)


def _yarn_fields(hf: dict) -> dict[str, Any]:
  """ModelConfig's yarn_* fields of config.json's `rope_scaling` (None, or YaRN)."""
  scaling = hf['rope_scaling']
  if scaling is None:
    return {}
  kind = scaling.get('rope_type', scaling.get('type'))
  if kind != 'yarn' or 'original_max_position_embeddings' not in scaling:
    raise InputError(f'{hf["model_type"]} checkpoint: rope_scaling={scaling!r} is not supported '
                     '(only None, or YaRN with original_max_position_embeddings)')
  optional = lambda key: None if scaling.get(key) is None else float(scaling[key])
  return dict(yarn_factor=float(scaling['factor']),
              yarn_original_length=int(scaling['original_max_position_embeddings']),
              yarn_beta_fast=float(scaling.get('beta_fast') or 32),  # the reference's `or`
              yarn_beta_slow=float(scaling.get('beta_slow') or 1),
              yarn_mscale=optional('mscale'), yarn_mscale_all_dim=optional('mscale_all_dim'),
              yarn_attention_factor=optional('attention_factor'),
              yarn_truncate=bool(scaling.get('truncate', True)))


def _deepseek_fields(hf: dict) -> dict[str, Any]:
  """The fields V2 and V3 share: MLA, YaRN, the dense first blocks, the experts' widths."""
  if hf['num_key_value_heads'] not in (None, hf['num_attention_heads']):
    raise InputError(f'{hf["model_type"]} checkpoint: num_key_value_heads='
                     f'{hf["num_key_value_heads"]} is not supported (MLA makes a key per head: '
                     f'only num_attention_heads={hf["num_attention_heads"]})')
  if hf.get('num_nextn_predict_layers'):
    warnings.warn(f'{hf["model_type"]} checkpoint: its {hf["num_nextn_predict_layers"]} '
                  'multi-token-prediction layer(s) are left out', stacklevel=2)
  dense = min(hf['first_k_dense_replace'], hf['num_hidden_layers'])
  return dict(_decoder_fields({**hf, 'head_dim': None}), num_kv_heads=None, attention='mla',
              q_lora_rank=hf['q_lora_rank'], kv_lora_rank=hf['kv_lora_rank'],
              qk_nope_head_dim=hf['qk_nope_head_dim'], qk_rope_head_dim=hf['qk_rope_head_dim'],
              v_head_dim=hf['v_head_dim'], **_yarn_fields(hf), ffn_dim=hf['moe_intermediate_size'],
              moe_every=1, dense_layers=tuple(range(dense)),
              dense_ffn_dim=hf['intermediate_size'], num_experts=hf['n_routed_experts'],
              num_shared_experts=hf['n_shared_experts'],
              routed_scaling_factor=float(hf['routed_scaling_factor']))


def _v2_config(hf: dict) -> ModelConfig:
  method = hf['topk_method']
  if method not in ('greedy', 'group_limited_greedy'):
    raise InputError(f"deepseek_v2 checkpoint: topk_method={method!r} is not supported (only "
                     "'greedy' or 'group_limited_greedy')")
  groups = dict(num_expert_groups=hf['n_group'], num_selected_groups=hf['topk_group'],
                group_score='max') if method == 'group_limited_greedy' else {}
  # transformers 4.57.6's V2 leaves YaRN's mscale out of the softmax scale.
  return ModelConfig(**_deepseek_fields(hf), **groups, mla_softmax_mscale=False)


def _v3_config(hf: dict) -> ModelConfig:
  return ModelConfig(**_deepseek_fields(hf), score_function='sigmoid',
                     num_expert_groups=hf['n_group'], num_selected_groups=hf['topk_group'],
                     group_score='top2_sum', normalize_weights=hf['norm_topk_prob'],
                     balancing_bias_rate=DEEPSEEK_V3_BIAS_RATE)


def _yarn_hub(config: ModelConfig) -> dict[str, Any] | None:
  if config.yarn_factor is None:
    return None
  optional = {key: getattr(config, f'yarn_{key}')
              for key in ('mscale', 'mscale_all_dim', 'attention_factor')
              if getattr(config, f'yarn_{key}') is not None}
  return dict(type='yarn', factor=config.yarn_factor,
              original_max_position_embeddings=config.yarn_original_length,
              beta_fast=config.yarn_beta_fast, beta_slow=config.yarn_beta_slow,
              truncate=config.yarn_truncate, **optional)


def _hub_config(config: ModelConfig, architecture: str) -> dict[str, Any]:
  dense = len(config.dense_layers)
  extended = ({} if config.yarn_factor is None else  # what transformers expects beside YaRN
              dict(max_position_embeddings=int(config.yarn_original_length * config.yarn_factor)))
  return dict(_hub_common(config), **extended, architectures=[architecture],
              q_lora_rank=config.q_lora_rank, kv_lora_rank=config.kv_lora_rank,
              qk_nope_head_dim=config.qk_nope_head_dim, qk_rope_head_dim=config.qk_rope_head_dim,
              v_head_dim=config.v_head_dim, rope_scaling=_yarn_hub(config),
              moe_intermediate_size=config.ffn_dim, intermediate_size=config.dense_width,
              first_k_dense_replace=dense, n_routed_experts=config.num_experts,
              n_shared_experts=config.num_shared_experts,
              routed_scaling_factor=config.routed_scaling_factor,
              n_group=config.num_expert_groups, topk_group=config.num_selected_groups)


def _v2_hub_config(config: ModelConfig) -> dict[str, Any]:
  grouped = config.num_selected_groups is not None
  return dict(_hub_config(config, 'DeepseekV2ForCausalLM'),
              topk_method='group_limited_greedy' if grouped else 'greedy')


def _v3_hub_config(config: ModelConfig) -> dict[str, Any]:
  return dict(_hub_config(config, 'DeepseekV3ForCausalLM'),
              norm_topk_prob=config.normalize_weights)


# Both: a SwiGLU decoder without tied output, the MLA projections without biases, no attention
# dropout (fine-tuning would differ).
_REFUSED = dict(hidden_act='silu', tie_word_embeddings=False, attention_bias=False,
                attention_dropout=0.0)
_IMPLEMENTED = (*(f for f in DECODER_IMPLEMENTED if f != 'num_key_value_heads'),
                'intermediate_size', 'moe_intermediate_size', 'q_lora_rank', 'kv_lora_rank',
                'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'rope_scaling',
                'first_k_dense_replace', 'n_routed_experts', 'n_shared_experts',
                'routed_scaling_factor', 'n_group', 'topk_group')
# Read by no code of 4.57.6 (or without effect on the outputs): DeepSeek's remote code's
# settings (moe_layer_freq, ep_size, pretraining_tp, auto_map), its training losses (aux_loss_alpha,
# seq_aux), the head_dim the config class derives (qk_rope_head_dim), the multi-token-prediction
# layers (left out, with a warning), how the weights are stored (quantization_config: FP8 is
# dequantized on import), and num_key_value_heads (MLA's keys have a head per query head; another
# value is refused).
_ACCEPTED = ('moe_layer_freq', 'ep_size', 'pretraining_tp', 'auto_map', 'aux_loss_alpha',
             'seq_aux', 'head_dim', 'num_nextn_predict_layers', 'quantization_config',
             'num_key_value_heads')
_DEFAULTS = dict(hidden_act='silu', tie_word_embeddings=False, attention_dropout=0.0,
                 attention_bias=False, rope_scaling=None, rms_norm_eps=1e-6, rope_theta=1e4,
                 kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                 v_head_dim=128)

DEEPSEEK_V2 = Family(
    'deepseek_v2', _v2_config, deepseek_tensors, _v2_hub_config,
    implemented=(*_IMPLEMENTED, 'topk_method'),
    # 4.57.6's V2 gate scores by softmax whatever scoring_func says, and never renormalizes.
    accepted=(*_ACCEPTED, 'scoring_func', 'norm_topk_prob'),
    refused=dict(_REFUSED, mlp_bias=False),
    defaults=dict(_DEFAULTS, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                  bos_token_id=1, eos_token_id=2, mlp_bias=False, first_k_dense_replace=0,
                  n_group=None, n_routed_experts=64, n_shared_experts=2,
                  routed_scaling_factor=1.0, topk_group=None, topk_method='greedy',
                  num_experts_per_tok=None, moe_intermediate_size=1407))
DEEPSEEK_V3 = Family(
    'deepseek_v3', _v3_config, deepseek_tensors, _v3_hub_config,
    implemented=(*_IMPLEMENTED, 'norm_topk_prob'),
    # 4.57.6's V3 gate is sigmoid and noaux_tc whatever these say.
    accepted=(*_ACCEPTED, 'scoring_func', 'topk_method'),
    refused=dict(_REFUSED, rope_interleave=True),
    defaults=dict(_DEFAULTS, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                  moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                  num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                  routed_scaling_factor=2.5, n_group=8, topk_group=4, num_experts_per_tok=8,
                  first_k_dense_replace=3, norm_topk_prob=True, bos_token_id=0, eos_token_id=1,
                  rope_interleave=True),
    open=Fp8Checkpoint)
