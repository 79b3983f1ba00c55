"""Qwen3-MoE checkpoints (Qwen3-30B-A3B, -235B-A22B): a Qwen2-MoE layout without the shared
expert, with each head's q and k RMS-normalized (one scale [A] all heads share) before the
rotary positions, and `attention_bias` on all four attention projections, the output's too."""
from __future__ import annotations

from moejax.convert.hf import (_DECODER_DEFAULTS, DECODER_IMPLEMENTED, DECODER_REFUSED, Family,
                               _decoder_fields, _hub_common, _swiglu_decoder)
from moejax.models import ModelConfig


def _qwen3_config(hf: dict) -> ModelConfig:
  """Layer i is sparse when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers
  (moejax's rule, with dense_layers); its dense FFNs are intermediate_size wide."""
  return ModelConfig(**_decoder_fields(hf), ffn_dim=hf['moe_intermediate_size'],
                     moe_every=hf['decoder_sparse_step'],
                     dense_layers=tuple(hf['mlp_only_layers'] or ()),
                     dense_ffn_dim=hf['intermediate_size'], num_experts=hf['num_experts'],
                     normalize_weights=hf['norm_topk_prob'], qk_head_norm=True,
                     attention_bias=hf['attention_bias'],
                     attention_out_bias=hf['attention_bias'])


def _qwen3_hub_config(config: ModelConfig) -> dict:
  return dict(_hub_common(config), architectures=['Qwen3MoeForCausalLM'],
              intermediate_size=config.dense_width, moe_intermediate_size=config.ffn_dim,
              num_experts=config.num_experts, decoder_sparse_step=config.moe_every,
              mlp_only_layers=list(config.dense_layers), norm_topk_prob=config.normalize_weights,
              attention_bias=config.attention_bias)


QWEN3_MOE = Family(
    'qwen3_moe', _qwen3_config, _swiglu_decoder('mlp', ('gate_proj', 'up_proj', 'down_proj')),
    _qwen3_hub_config,
    implemented=(*DECODER_IMPLEMENTED, 'head_dim', 'intermediate_size', 'decoder_sparse_step',
                 'moe_intermediate_size', 'num_experts', 'norm_topk_prob', 'mlp_only_layers',
                 'attention_bias'),
    # The window is off unless use_sliding_window (refused), whatever its size and layers.
    accepted=('sliding_window', 'max_window_layers'),
    refused=dict(DECODER_REFUSED, use_sliding_window=False),
    defaults=dict(_DECODER_DEFAULTS, vocab_size=151936, hidden_size=2048,
                  intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=4, rms_norm_eps=1e-6, bos_token_id=None,
                  eos_token_id=None, rope_theta=1e4, attention_bias=False,
                  use_sliding_window=False, decoder_sparse_step=1, moe_intermediate_size=768,
                  num_experts_per_tok=8, num_experts=128, norm_topk_prob=False,
                  mlp_only_layers=[]))
