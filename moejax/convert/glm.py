"""GLM-4.5 checkpoints (`glm4_moe`: GLM-4.5, GLM-4.5-Air, GLM-4.6): grouped-query attention with
biases on the query, key and value projections (not the output), optionally each head's q and k
RMS-normalized (`use_qk_norm`), rotary positions on the first `partial_rotary_factor` of each
head's dims; DeepSeek-V3's FFNs (`moejax.convert.deepseek`): sigmoid scores,
`e_score_correction_bias` added to choose only (the balancing bias), groups ranked by their two
best, `norm_topk_prob`, `routed_scaling_factor`, shared experts, the first
`first_k_dense_replace` blocks dense. The multi-token-prediction layer is left out."""
from __future__ import annotations

import functools
import warnings

from moejax.convert.deepseek import DEEPSEEK_V3_BIAS_RATE, _deepseek_moe, _yarn_fields, _yarn_hub
from moejax.convert.hf import (DECODER_IMPLEMENTED, Family, _decoder_fields, _hub_common,
                               decoder_tensors)
from moejax.models import ModelConfig


def _glm_config(hf: dict) -> ModelConfig:
  if hf.get('num_nextn_predict_layers'):
    warnings.warn(f'glm4_moe checkpoint: its {hf["num_nextn_predict_layers"]} '
                  'multi-token-prediction layer(s) are left out', stacklevel=2)
  dense = min(hf['first_k_dense_replace'], hf['num_hidden_layers'])
  return ModelConfig(
      **_decoder_fields(hf), **_yarn_fields(hf), rotary_fraction=hf['partial_rotary_factor'],
      attention_bias=hf['attention_bias'], qk_head_norm=hf['use_qk_norm'],
      ffn_dim=hf['moe_intermediate_size'], moe_every=1, dense_layers=tuple(range(dense)),
      dense_ffn_dim=hf['intermediate_size'], num_experts=hf['n_routed_experts'],
      num_shared_experts=hf['n_shared_experts'],
      routed_scaling_factor=float(hf['routed_scaling_factor']), score_function='sigmoid',
      num_expert_groups=hf['n_group'], num_selected_groups=hf['topk_group'],
      group_score='top2_sum', normalize_weights=hf['norm_topk_prob'],
      balancing_bias_rate=DEEPSEEK_V3_BIAS_RATE)


def _glm_hub_config(config: ModelConfig) -> dict:
  return dict(_hub_common(config), architectures=['Glm4MoeForCausalLM'],
              head_dim=config.attention_head_dim, partial_rotary_factor=config.rotary_fraction,
              attention_bias=config.attention_bias, use_qk_norm=config.qk_head_norm,
              rope_scaling=_yarn_hub(config), intermediate_size=config.dense_width,
              moe_intermediate_size=config.ffn_dim,
              first_k_dense_replace=len(config.dense_layers),
              n_routed_experts=config.num_experts, n_shared_experts=config.num_shared_experts,
              routed_scaling_factor=config.routed_scaling_factor,
              n_group=config.num_expert_groups, topk_group=config.num_selected_groups,
              norm_topk_prob=config.normalize_weights)


GLM4_MOE = Family(
    'glm4_moe', _glm_config,
    lambda config: decoder_tensors(config, functools.partial(_deepseek_moe, config)),
    _glm_hub_config,
    implemented=(*DECODER_IMPLEMENTED, 'head_dim', 'partial_rotary_factor', 'attention_bias',
                 'use_qk_norm', 'rope_scaling', 'intermediate_size', 'moe_intermediate_size',
                 'first_k_dense_replace', 'n_routed_experts', 'n_shared_experts',
                 'routed_scaling_factor', 'n_group', 'topk_group', 'norm_topk_prob'),
    # The multi-token-prediction layers: left out, with a warning.
    accepted=('num_nextn_predict_layers',),
    refused=dict(hidden_act='silu', tie_word_embeddings=False, attention_dropout=0.0),
    defaults=dict(head_dim=None, vocab_size=151552, hidden_size=4096, intermediate_size=10944,
                  num_hidden_layers=46, num_attention_heads=96, partial_rotary_factor=0.5,
                  num_key_value_heads=8, hidden_act='silu', rms_norm_eps=1e-5,
                  tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
                  attention_bias=False, attention_dropout=0.0, moe_intermediate_size=1408,
                  num_experts_per_tok=8, n_shared_experts=1, n_routed_experts=128,
                  routed_scaling_factor=1.0, n_group=1, topk_group=1, first_k_dense_replace=1,
                  norm_topk_prob=True, use_qk_norm=False, bos_token_id=None,
                  eos_token_id=None))
