"""Tiny random Hugging Face MoE models and their outputs: the references moejax's import is tested
against (`tests/test_convert.py`). Not run by `make test`: it needs torch and transformers 4.57.6.

  python -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers==4.57.6
  /tmp/hf/bin/python tools/make_hf_fixtures.py tests/fixtures/hf

For each family, <out>/<family>/ holds the model in hub layout (config.json, model.safetensors) and
reference.npz: input_ids [B, L], logits [B, L, V] float32, and per MoE layer (stacked) the router
probabilities [layers, B * L, E] and the chosen experts [layers, B * L, K]. The weights are drawn
with a large enough scale that logits differ visibly and every token's K-th and (K+1)-th router
probabilities differ by at least MIN_MARGIN, so the expert choices are not decided by rounding.
"""
import argparse
import os

import numpy as np
import torch
import transformers

BATCH, LENGTH, VOCAB = 2, 12, 260  # 260: room for the byte tokenizer's 259 ids
MIN_MARGIN = 1e-3
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
              tie_word_embeddings=False, attn_implementation='eager')

FAMILIES = {
    'mixtral': (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6,
        rms_norm_eps=1e-5)),
    'olmoe': (transformers.OlmoeConfig, transformers.OlmoeForCausalLM, dict(
        intermediate_size=24, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False,
        rms_norm_eps=1e-5)),
    'qwen2_moe': (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, dict(
        intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=48,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
        rms_norm_eps=1e-6, rope_theta=1e4)),
    # Three layers, the middle one dense (mlp_only_layers), a head width other than D / H, and
    # biases on all four attention projections.
    'qwen3_moe': (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
        num_hidden_layers=3, head_dim=12, intermediate_size=40, moe_intermediate_size=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        attention_bias=True, rms_norm_eps=1e-6, rope_theta=1e6)),
    # Sliding (window 4 of the 12 positions) and full layers, YaRN positions, a head width
    # other than D / H; unquantized (tools/make_published_fixtures.py quantizes its experts).
    'gpt_oss': (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
        head_dim=12, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=4, rope_theta=150000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type='yarn', factor=4.0, beta_fast=32.0, beta_slow=1.0,
                          original_max_position_embeddings=16, truncate=False))),
}
# Families whose norm scales, biases and attention sinks are drawn too (transformers initializes
# them to 1 and 0, which would hide one read into the wrong place).
DRAWN_NORMS_AND_BIASES = ('qwen3_moe', 'gpt_oss')
# Switch: an encoder-decoder whose every other FFN is sparse, top-1 with a fixed capacity of 3
# tokens per expert and sequence, so that some of the 12 tokens of a sequence are dropped.
SWITCH = dict(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
              num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
              num_experts=4, expert_capacity=3, dropout_rate=0.0,
              tie_word_embeddings=True)


def router_logits(model, input_ids) -> tuple:
  """(the model's output, each MoE layer's router logits [B * L, E]); gpt-oss's output has the
  top-K weights in their place, so its routers' logits are recomputed from their inputs."""
  if not isinstance(model, transformers.GptOssForCausalLM):
    out = model(input_ids=input_ids, output_router_logits=True)
    return out, out.router_logits
  inputs = []
  hooks = [m.register_forward_hook(lambda m, args, out: inputs.append((m, args[0])))
           for name, m in model.named_modules() if name.endswith('mlp.router')]
  out = model(input_ids=input_ids)
  for hook in hooks:
    hook.remove()
  return out, [torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), m.weight, m.bias)
               for m, x in inputs]


def _reference(model, config, input_ids):
  with torch.no_grad():
    out, logits = router_logits(model, input_ids)
  k = config.num_experts_per_tok
  probs = torch.stack([torch.softmax(r.float(), -1) for r in logits])
  top = torch.sort(probs, -1, descending=True).values
  margin = float((top[..., k - 1] - top[..., k]).min())
  return {'input_ids': input_ids.numpy().astype(np.int32), 'logits': out.logits.float().numpy(),
          'router_probs': probs.numpy(), 'experts': torch.topk(probs, k, -1).indices.numpy(),
          'margin': np.float32(margin)}


def _draw_norms_and_biases(model) -> None:
  """Every bias (N(0, 0.2)) and other 1-D parameter (norm scales, sinks: 1 + N(0, 0.2)), in
  place."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('bias') or param.ndim == 1:
        param.copy_(torch.randn_like(param) * 0.2 + (0.0 if name.endswith('bias') else 1.0))


def make(family: str, out: str) -> None:
  config_class, model_class, fields = FAMILIES[family]
  for seed in range(100):  # the first seed whose expert choices are clear
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **fields})
    model = model_class(config).eval()
    if family in DRAWN_NORMS_AND_BIASES:
      _draw_norms_and_biases(model)
    input_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    reference = _reference(model, config, input_ids)
    if reference['margin'] >= MIN_MARGIN:
      break
  else:
    raise SystemExit(f'{family}: no seed below 100 gives router margins >= {MIN_MARGIN}')
  directory = os.path.join(out, family)
  model.save_pretrained(directory, safe_serialization=True)
  np.savez_compressed(os.path.join(directory, 'reference.npz'), **reference)
  print(f'{family}: seed {seed}, margin {reference["margin"]:.2e}, '
        f'{sum(p.numel() for p in model.parameters())} parameters -> {directory}')


def make_switch(out: str) -> None:
  """reference.npz adds decoder_input_ids [B, L] and, per sparse layer (the encoder's, then the
  decoder's), `dropped` [layers, B * L]: the tokens over their expert's capacity."""
  for seed in range(100):
    torch.manual_seed(seed)
    config = transformers.SwitchTransformersConfig(**SWITCH)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    routers = []  # each router's (one-hot [B, L, E] of the tokens within capacity, logits)
    for name, module in model.named_modules():
      if name.endswith('mlp.router'):
        module.register_forward_hook(lambda m, args, out: routers.append((out[0], out[2])))
    ids = lambda s: torch.randint(3, VOCAB, (BATCH, LENGTH),
                                  generator=torch.Generator().manual_seed(s))
    inputs, decoder_inputs = ids(0), ids(1)
    with torch.no_grad():
      result = model(input_ids=inputs, decoder_input_ids=decoder_inputs)
    probs = torch.stack([torch.softmax(r.float(), -1).reshape(-1, config.num_experts)
                         for _, r in routers])
    top = torch.sort(probs, -1, descending=True).values
    dropped = torch.stack([m.reshape(-1, config.num_experts).sum(-1) == 0 for m, _ in routers])
    if float((top[..., 0] - top[..., 1]).min()) >= MIN_MARGIN and 0 < int(dropped.sum()):
      break
  else:
    raise SystemExit(f'switch: no seed below 100 gives clear choices and dropped tokens')
  directory = os.path.join(out, 'switch_transformers')
  model.save_pretrained(directory, safe_serialization=True)
  np.savez_compressed(
      os.path.join(directory, 'reference.npz'), input_ids=inputs.numpy().astype(np.int32),
      decoder_input_ids=decoder_inputs.numpy().astype(np.int32), logits=result.logits.numpy(),
      router_probs=probs.numpy(), experts=probs.argmax(-1, keepdim=True).numpy(),
      dropped=dropped.numpy())
  print(f'switch_transformers: seed {seed}, {int(dropped.sum())} of {dropped.numel()} token '
        f'choices dropped, {sum(p.numel() for p in model.parameters())} parameters -> {directory}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('out', help='directory to write <family>/ into')
  parser.add_argument('--families', nargs='*', default=[*FAMILIES, 'switch_transformers'])
  args = parser.parse_args()
  assert transformers.__version__ == '4.57.6', transformers.__version__
  for family in args.families:
    if family == 'switch_transformers':
      make_switch(args.out)
    else:
      make(family, args.out)


if __name__ == '__main__':
  main()
