"""DeepSeek-V2 and -V3 fixtures and transformers 4.57.6's outputs on them (`tests/test_deepseek.py`,
`tests/test_hub_configs.py`). Not run by `make test`: it needs torch and transformers 4.57.6 (see
tools/make_hf_fixtures.py for the scratch venv).

  /tmp/hf/bin/python tools/make_deepseek_fixtures.py tests/fixtures/hf

Tiny random models (<out>/<name>/, as tools/make_hf_fixtures.py makes them): deepseek_v2
(V2-Lite's layout: greedy top-k, no query latent), deepseek_v2_grouped (V2's: group-limited
greedy, a query latent, routed scaling), deepseek_v3 (sigmoid scores, a drawn correction bias,
groups ranked by their two best, shared experts, YaRN with both mscales), deepseek_v3_fp8 (that
model's weights quantized as DeepSeek publishes them: float8 e4m3 with a float32 scale per 16 x 16
block, `weight_scale_inv`); glm4_moe (GLM-4.5's attention over V3's routing). And the published
DeepSeek-V2-Lite, DeepSeek-V3 and GLM-4.7 (glm4_moe) config.json files
(tools/published/) with their sizes shrunk, in <out>/published/<org>__<name>/ as
tools/make_published_fixtures.py writes them (V3's weights FP8 in 128 x 128 blocks, as published,
and two tensors of a multi-token-prediction layer that the import leaves out).

reference.npz: input_ids [B, L], logits [B, L, V] float32, per MoE layer (stacked) router_probs
[layers, B * L, E] (what moejax sows: softmax probabilities, or sigmoid scores over their sum),
experts [layers, B * L, K] (the chosen experts, best choice score first) and weights [layers,
B * L, K] (their combine weights), and `margin`: the smallest gap, over tokens and MoE layers,
between the K-th and (K+1)-th choice scores and between the last kept and the first dropped
group. An FP8 fixture's reference comes from its dequantized weights (W * scale per block), which
reference.npz holds too, as `dequantized/<hub name>`.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import safetensors.torch
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_published_fixtures as published  # noqa: E402
from make_hf_fixtures import (BATCH, COMMON, LENGTH, MIN_MARGIN, VOCAB,  # noqa: E402
                              _draw_norms_and_biases)

MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
TINY = dict(COMMON, num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1,
            intermediate_size=48, moe_intermediate_size=12, n_routed_experts=8,
            num_experts_per_tok=2, **MLA)
FIXTURES = {
    'deepseek_v2': (transformers.DeepseekV2Config, dict(
        TINY, q_lora_rank=None, n_shared_experts=2, topk_method='greedy',
        rope_scaling=dict(type='yarn', factor=4.0, original_max_position_embeddings=16,
                          beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707))),
    'deepseek_v2_grouped': (transformers.DeepseekV2Config, dict(
        TINY, q_lora_rank=12, n_shared_experts=1, topk_method='group_limited_greedy', n_group=4,
        topk_group=2, routed_scaling_factor=2.0,
        rope_scaling=dict(type='yarn', factor=4.0, original_max_position_embeddings=16,
                          mscale=1.0, mscale_all_dim=0.5))),
    'deepseek_v3': (transformers.DeepseekV3Config, dict(
        TINY, q_lora_rank=12, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_scaling=dict(type='yarn', factor=4.0, original_max_position_embeddings=16,
                          beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.707))),
    # GLM-4.5's attention (GQA, q/k/v biases, per-head QK-norm, half of each head's dims
    # rotary, head_dim 12 not D / H) over V3's routing; its norms and biases drawn too.
    'glm4_moe': (transformers.Glm4MoeConfig, dict(
        COMMON, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=48,
        moe_intermediate_size=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=12,
        partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True, rope_theta=1e6)),
}
FP8_BLOCK = (16, 16)  # the tiny FP8 fixture's blocks: several per weight, some partial
PUBLISHED = {
    'deepseek-ai__DeepSeek-V2-Lite': ('deepseek_v2', dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=48, moe_intermediate_size=8, **MLA)),
    'deepseek-ai__DeepSeek-V3': ('deepseek_v3', dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=48, moe_intermediate_size=8, q_lora_rank=16, **MLA)),
    # Its 3 dense blocks and one sparse; all 160 experts.
    'zai-org__GLM-4.7': ('glm4_moe', dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=48, moe_intermediate_size=8)),
}
CLASSES = {'deepseek_v2': transformers.DeepseekV2Config,
           'deepseek_v3': transformers.DeepseekV3Config, 'glm4_moe': transformers.Glm4MoeConfig}


def _router_record(model) -> list:
  """Hooks on each MoE gate: it appends (inputs [B * L, D], chosen [B * L, K], weights)."""
  records = []
  for module in model.modules():
    if type(module).__name__ in ('DeepseekV2MoEGate', 'DeepseekV3TopkRouter',
                                 'Glm4MoeTopkRouter'):
      module.register_forward_hook(lambda m, args, out: records.append(
          (m, args[0].reshape(-1, args[0].shape[-1]), out[0], out[1])))
  return records


def _choice(gate, hidden: torch.Tensor):
  """(moejax's router probabilities [T, E], the scores that choose [T, E], group scores
  [T, n_group] or None, kept groups) of a gate, as 4.57.6 computes them."""
  logits = hidden.float() @ gate.weight.float().T
  v3 = hasattr(gate, 'e_score_correction_bias')
  scores = logits.sigmoid() if v3 else logits.softmax(-1)
  probs = scores / (scores.sum(-1, keepdim=True) + 1e-20) if v3 else scores
  choice = scores + gate.e_score_correction_bias if v3 else scores
  grouped = v3 or gate.topk_method == 'group_limited_greedy'
  if not grouped:
    return probs, choice, None, None
  n_group = gate.n_group if v3 else gate.num_group
  per_group = choice.view(len(choice), n_group, -1)
  group_scores = per_group.topk(2, -1)[0].sum(-1) if v3 else per_group.max(-1).values
  kept = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(gate.topk_group)[1], 1)
  mask = kept.bool().repeat_interleave(choice.shape[-1] // n_group, 1)
  return probs, choice.masked_fill(~mask, 0.0), group_scores, gate.topk_group


def _gap(values: torch.Tensor, k: int) -> float:
  top = values.sort(-1, descending=True).values
  return float((top[:, k - 1] - top[:, k]).min())


def _reference(model, input_ids) -> dict:
  records = _router_record(model)
  with torch.no_grad():
    logits = model(input_ids=input_ids).logits
  probs, experts, weights, margins = [], [], [], []
  for gate, hidden, chosen, weight in records:
    with torch.no_grad():
      prob, choice, group_scores, kept = _choice(gate, hidden)
    order = choice.gather(1, chosen).argsort(-1, descending=True)  # best choice first
    probs.append(prob)
    experts.append(chosen.gather(1, order))
    weights.append(weight.float().gather(1, order))
    margins.append(_gap(choice, chosen.shape[1]))
    if group_scores is not None and kept < group_scores.shape[1]:  # some group left out
      margins.append(_gap(group_scores, kept))
  return {'input_ids': input_ids.numpy().astype(np.int32), 'logits': logits.float().numpy(),
          'router_probs': torch.stack(probs).numpy(), 'experts': torch.stack(experts).numpy(),
          'weights': torch.stack(weights).numpy(), 'margin': np.float32(min(margins))}


def _quantized(name: str, weight: torch.Tensor) -> bool:
  """Whether DeepSeek's FP8 checkpoints store this tensor quantized: the Linear weights of the
  layers (projections, experts), not the router, the norms, the embedding or the output."""
  return name.startswith('model.layers.') and name.endswith('_proj.weight') and weight.ndim == 2


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int]):
  """(float8 e4m3 weight, float32 scale_inv per block, the dequantized float32 weight): each
  block scaled so its largest magnitude is e4m3's 448."""
  rows, columns = weight.shape
  padded = torch.zeros(-(-rows // block[0]) * block[0], -(-columns // block[1]) * block[1])
  padded[:rows, :columns] = weight.float()
  blocks = padded.view(padded.shape[0] // block[0], block[0], -1, block[1])
  scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [rows / b0, columns / b1]
  expanded = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
  quantized = (padded / expanded).to(torch.float8_e4m3fn)[:rows, :columns]
  dequantized = quantized.float() * expanded[:rows, :columns]
  return quantized.contiguous(), scale.float().contiguous(), dequantized


def _save_fp8(model, directory: str, block: tuple[int, int], extra: dict) -> dict:
  """Quantize the model's weights in place (it then computes with the dequantized ones) and
  write them as DeepSeek does (safetensors: the FP8 weights, their `weight_scale_inv`, the
  rest as they are, plus `extra` tensors); {hub name: dequantized weight}."""
  tensors, dequantized = dict(extra), {}
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if _quantized(name, tensor):
        weight, scale, exact = quantize_fp8(tensor, block)
        tensors[name], tensors[name + '_scale_inv'] = weight, scale
        tensor.copy_(exact)
        dequantized[name] = exact.numpy()
      else:
        tensors[name] = tensor.contiguous()
  safetensors.torch.save_file(tensors, os.path.join(directory, 'model.safetensors'),
                              metadata={'format': 'pt'})
  return dequantized


def _draw_biases(model) -> None:
  """V3's correction biases, drawn (4.57.6 starts them at zero) so they change choices."""
  for module in model.modules():
    if hasattr(module, 'e_score_correction_bias'):
      module.e_score_correction_bias.normal_(0.0, 0.05)


def _model(config_class, fields: dict, seed: int):
  torch.manual_seed(seed)
  config = config_class(**fields)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager')
  model = model.to(torch.float32).eval()  # whatever torch_dtype the published file names
  _draw_biases(model)
  if isinstance(model, transformers.Glm4MoeForCausalLM):
    _draw_norms_and_biases(model)
  return model


def _write_config(directory: str, hub: dict) -> None:
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hub, f, indent=2)


def make_tiny(name: str, out: str) -> None:
  config_class, fields = FIXTURES[name]
  input_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
  for seed in range(200):
    model = _model(config_class, fields, seed)
    reference = _reference(model, input_ids)
    if reference['margin'] >= MIN_MARGIN:
      break
  else:
    raise SystemExit(f'{name}: no seed below 200 gives router margins >= {MIN_MARGIN}')
  directory = os.path.join(out, name)
  shutil.rmtree(directory, ignore_errors=True)
  model.save_pretrained(directory, safe_serialization=True)
  np.savez_compressed(os.path.join(directory, 'reference.npz'), **reference)
  print(f'{name}: seed {seed}, margin {reference["margin"]:.2e} -> {directory}')
  if name == 'deepseek_v3':
    make_fp8(model, config_class, fields, input_ids, os.path.join(out, 'deepseek_v3_fp8'))


def make_fp8(model, config_class, fields: dict, input_ids, directory: str) -> None:
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  dequantized = _save_fp8(model, directory, FP8_BLOCK, {})
  hub = json.loads(model.config.to_json_string())
  hub['quantization_config'] = dict(activation_scheme='dynamic', fmt='e4m3', quant_method='fp8',
                                    weight_block_size=list(FP8_BLOCK))
  _write_config(directory, hub)
  reference = _reference(model, input_ids)
  reference.update({f'dequantized/{name}': w for name, w in dequantized.items()})
  np.savez_compressed(os.path.join(directory, 'reference.npz'), **reference)
  print(f'deepseek_v3_fp8: {len(dequantized)} weights in FP8, margin '
        f'{reference["margin"]:.2e} -> {directory}')


def make_published(name: str, out: str) -> None:
  family, shrink = PUBLISHED[name]
  directory = os.path.join(out, name)
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  published._byte_level_tokenizer(directory, ['<|endoftext|>', '<|padding|>'], qwen=False)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  special = tokenizer.convert_tokens_to_ids('<|endoftext|>')
  hub = {**published._published(name), **shrink, 'vocab_size': published._vocab_size(tokenizer)}
  for field in ('bos_token_id', 'eos_token_id', 'pad_token_id'):  # the published ones, renumbered
    if field in hub:
      hub[field] = [special] if isinstance(hub[field], list) else special
  fields = {k: v for k, v in hub.items() if k != 'quantization_config'}
  ids = torch.randint(3, len(tokenizer), (BATCH, LENGTH),
                      generator=torch.Generator().manual_seed(0))
  for seed in range(200):
    model = _model(CLASSES[family], {**fields, 'initializer_range': 0.2}, seed)
    reference = _reference(model, ids)
    if reference['margin'] >= published.MIN_MARGIN:
      break
  else:
    raise SystemExit(f'{name}: no seed below 200 gives router margins >= {published.MIN_MARGIN}')
  if 'quantization_config' in hub:
    block = tuple(hub['quantization_config']['weight_block_size'])
    layer = hub['num_hidden_layers']  # the multi-token-prediction layer's, left out on import
    extra = {f'model.layers.{layer}.eh_proj.weight': torch.randn(hub['hidden_size'],
                                                                 2 * hub['hidden_size']),
             f'model.layers.{layer}.enorm.weight': torch.ones(hub['hidden_size'])}
    _save_fp8(model, directory, block, extra)
    reference = _reference(model, ids)  # the dequantized model's
  else:
    model.save_pretrained(directory, safe_serialization=True)
  _write_config(directory, hub)  # the published fields, as published (sizes shrunk)
  for i, text in enumerate(published.TEXTS):
    reference[f'texts_ids_{i}'] = np.asarray(tokenizer(text, add_special_tokens=False).input_ids,
                                             np.int32)
    reference[f'texts_ids_special_{i}'] = np.asarray(tokenizer(text).input_ids, np.int32)
  reference['k'] = np.int32(hub['num_experts_per_tok'])
  np.savez_compressed(os.path.join(directory, 'reference.npz'), **reference)
  print(f'{name}: seed {seed}, margin {reference["margin"]:.2e} -> {directory}')


def reference_fields(out: str) -> None:
  """Add the DeepSeek config classes' fields with their defaults to
  <out>/reference_config_fields.json (tools/make_published_fixtures.py writes the others)."""
  import inspect
  path = os.path.join(out, 'reference_config_fields.json')
  with open(path) as f:
    fields = json.load(f)
  for family, config_class in CLASSES.items():
    params = inspect.signature(config_class.__init__).parameters.items()
    fields[family] = {k: v.default for k, v in params if k not in ('self', 'kwargs')}
  with open(path, 'w') as f:
    json.dump(fields, f, indent=2, sort_keys=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('out', help='tests/fixtures/hf: tiny models there, published ones in '
                      'published/')
  parser.add_argument('--only', nargs='*', default=None)
  args = parser.parse_args()
  assert transformers.__version__ == '4.57.6', transformers.__version__
  for name in FIXTURES:
    if args.only is None or name in args.only:
      make_tiny(name, args.out)
  published_dir = os.path.join(args.out, 'published')
  reference_fields(published_dir)
  for name in PUBLISHED:
    if args.only is None or name in args.only:
      make_published(name, published_dir)


if __name__ == '__main__':
  main()
