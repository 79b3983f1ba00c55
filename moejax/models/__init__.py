"""Transformer models with a configurable MoE layout, and their FLOP-matched dense baselines."""
from moejax.models.config import ModelConfig, per_token_flops
from moejax.models.transformer import DecoderLM, EncoderDecoder, make_model

__all__ = ['DecoderLM', 'EncoderDecoder', 'ModelConfig', 'make_model', 'per_token_flops']
