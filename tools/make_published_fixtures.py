"""Published hub configs with their sizes shrunk, the tokenizer of each family's kind, and
transformers 4.57.6's outputs on them: what `tests/test_hub_configs.py` checks moejax's import
against. Not run by `make test`: it needs torch and transformers 4.57.6 (see
tools/make_hf_fixtures.py for the scratch venv).

  /tmp/hf/bin/python tools/make_published_fixtures.py tests/fixtures/hf/published

For each checkpoint whose config.json was found (tools/published/, SOURCES.md there says where),
<out>/<org>__<name>/ holds:
  config.json          the published file, every field with its published value but the sizes
                       (SHRINK) and the special-token ids, which follow the small tokenizer
  model.safetensors    random weights (float32) of that config, saved by transformers
  tokenizer files      a tokenizer of the family's kind, trained here on data/tinyshakespeare.txt
                       with the `tokenizers` library (Mixtral: SentencePiece-style BPE with byte
                       fallback; OLMoE: GPT-NeoX byte-level BPE; Qwen: byte-level BPE with Qwen's
                       pre-tokenizer; Switch: a T5 SentencePiece unigram with 100 <extra_id_i>),
                       saved by the family's transformers tokenizer class, with the published
                       tokenizer_config.json / generation_config.json where they were found
  reference.npz        what transformers gives after loading that very directory: input_ids,
                       logits [B, L, V], router_probs [sparse layers, B * L, E], experts
                       [sparse layers, B * L, K]; for Switch decoder_input_ids and `dropped`
                       [sparse layers, B * L]; and `texts_ids_<i>` / `texts_ids_special_<i>`:
                       AutoTokenizer's ids of TEXTS[i] without / with special tokens
and <out>/reference_config_fields.json: each family's config class fields with their defaults.
"""
import argparse
import inspect
import json
import os
import shutil

import numpy as np
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from make_hf_fixtures import router_logits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(REPO, 'tools', 'published')
TEXTS = ('The quick brown fox, 42 times.', 'Thé café à Noël: déjà vu.', '東京は晴れです。',
         'Rocket 🚀 and snake 🐍!')
BATCH, LENGTH, MIN_MARGIN = 2, 12, 1e-4
FAMILY_CLASSES = {'mixtral': transformers.MixtralConfig, 'olmoe': transformers.OlmoeConfig,
                  'qwen2_moe': transformers.Qwen2MoeConfig,
                  'qwen3_moe': transformers.Qwen3MoeConfig,
                  'gpt_oss': transformers.GptOssConfig,
                  'switch_transformers': transformers.SwitchTransformersConfig}

# Each found checkpoint: its family and the sizes its fixture shrinks (every other field keeps
# its published value). The number of experts is kept where the weights stay small.
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CHECKPOINTS = {
    'mistralai__Mixtral-8x7B-v0.1': ('mixtral', dict(DECODER, intermediate_size=48)),
    'mistral-community__Mixtral-8x22B-v0.1': ('mixtral', dict(DECODER, intermediate_size=48)),
    'allenai__OLMoE-1B-7B-0924': ('olmoe', dict(DECODER, num_key_value_heads=4,
                                                intermediate_size=16)),
    'Qwen__Qwen2-57B-A14B': ('qwen2_moe', dict(DECODER, intermediate_size=48,
                                               moe_intermediate_size=16,
                                               shared_expert_intermediate_size=128)),
    'Qwen__Qwen3-30B-A3B': ('qwen3_moe', dict(DECODER, head_dim=16, intermediate_size=48,
                                              moe_intermediate_size=8)),
    # Widths of 32: MXFP4 blocks are 32 inputs; a window of 4 of the 12 positions.
    'openai__gpt-oss-20b': ('gpt_oss', dict(
        DECODER, head_dim=16, intermediate_size=32, sliding_window=4,
        layer_types=['sliding_attention', 'full_attention'])),
    'google__switch-base-32': ('switch_transformers', dict(
        d_model=16, d_kv=8, num_heads=2, d_ff=16, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, expert_capacity=1)),
    'google__switch-base-256': ('switch_transformers', dict(
        d_model=16, d_kv=8, num_heads=2, d_ff=16, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, expert_capacity=1)),
    'google__switch-c-2048': ('switch_transformers', dict(
        d_model=16, d_kv=8, num_heads=2, d_ff=16, num_layers=3, num_decoder_layers=2,
        num_sparse_encoder_layers=3, num_sparse_decoder_layers=3, num_experts=64,
        expert_capacity=1)),
}
# Not published files: Qwen2-57B-A14B's and Qwen3-30B-A3B's with dense layers among the sparse
# ones, the layout Qwen's mlp_only_layers and decoder_sparse_step describe (blocks 0 and 2 dense
# by the step, block 1 by mlp_only_layers, block 3 sparse).
QWEN_DENSE_LAYERS = dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[1])
VARIANTS = {f'{name}__dense_layers': (name, QWEN_DENSE_LAYERS)
            for name in ('Qwen__Qwen2-57B-A14B', 'Qwen__Qwen3-30B-A3B')}


def _corpus(chars: int = 60_000) -> list[str]:
  with open(os.path.join(REPO, 'data', 'tinyshakespeare.txt'), encoding='utf-8') as f:
    return f.read(chars).splitlines()


def _llama_tokenizer(directory: str) -> None:
  """SentencePiece-style BPE with byte fallback, <unk> 0, <s> 1, </s> 2 (Llama's, Mixtral's)."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>', byte_fallback=True, fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend('▁'), normalizers.Replace(' ', '▁')])
  tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<unk>', '<s>', '</s>']))
  layout = json.loads(tok.to_str())
  vocab = layout['model']['vocab']
  vocab.update({f'<0x{b:02X}>': len(vocab) + b for b in range(256)})
  tok = tokenizers.Tokenizer.from_str(json.dumps(layout))
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)])
  fast = transformers.LlamaTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                                         unk_token='<unk>', add_bos_token=True)
  fast.save_pretrained(directory)


def _byte_level_tokenizer(directory: str, specials: list[str], qwen: bool) -> None:
  """Byte-level BPE: GPT-NeoX's (OLMoE; gpt-oss's o200k is byte-level BPE too, its specials
  given) or Qwen's (its pre-tokenizer pattern, NFC)."""
  tok = tokenizers.Tokenizer(models.BPE())
  if qwen:
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if qwen:
    fast = transformers.Qwen2TokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>',
                                           pad_token='<|endoftext|>', unk_token=None,
                                           bos_token=None)
  elif '<|return|>' in specials:  # gpt-oss's special_tokens_map
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<|startoftext|>',
                                                eos_token='<|return|>',
                                                pad_token='<|endoftext|>')
  else:
    fast = transformers.GPTNeoXTokenizerFast(tokenizer_object=tok, eos_token='<|endoftext|>',
                                             pad_token='<|padding|>', bos_token='<|endoftext|>',
                                             unk_token='<|endoftext|>')
  fast.save_pretrained(directory)


def _t5_tokenizer(directory: str) -> None:
  """T5's: a SentencePiece unigram (pad 0, eos 1, unk 2) and 100 <extra_id_i> past it."""
  import io

  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([line for line in _corpus() if line.strip()] + list(TEXTS) * 3),
      model_writer=model, vocab_size=300, model_type='unigram', character_coverage=1.0,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
  path = os.path.join(directory, 'spiece.model')
  with open(path, 'wb') as f:
    f.write(model.getvalue())
  transformers.T5TokenizerFast(vocab_file=path, extra_ids=100, legacy=True).save_pretrained(
      directory)


def _tokenizer(family: str, directory: str) -> transformers.PreTrainedTokenizerBase:
  if family == 'mixtral':
    _llama_tokenizer(directory)
  elif family == 'olmoe':
    _byte_level_tokenizer(directory, ['<|endoftext|>', '<|padding|>'], qwen=False)
  elif family in ('qwen2_moe', 'qwen3_moe'):
    _byte_level_tokenizer(directory, ['<|endoftext|>', '<|im_start|>', '<|im_end|>'], qwen=True)
  elif family == 'gpt_oss':
    _byte_level_tokenizer(directory, ['<|startoftext|>', '<|endoftext|>', '<|return|>'],
                          qwen=False)
  else:
    _t5_tokenizer(directory)
  return transformers.AutoTokenizer.from_pretrained(directory)


def _published(name: str) -> dict:
  with open(os.path.join(PUBLISHED, name, 'config.json')) as f:
    return json.load(f)


def _special_ids(family: str, hub: dict, tokenizer) -> dict:
  """The published special-token ids, renumbered for the small tokenizer."""
  ids = {}
  lookup = tokenizer.convert_tokens_to_ids
  if family == 'mixtral':
    ids = dict(bos_token_id=lookup('<s>'), eos_token_id=lookup('</s>'))
  elif family == 'olmoe':
    ids = dict(eos_token_id=lookup('<|endoftext|>'), pad_token_id=lookup('<|padding|>'))
  elif family == 'qwen2_moe':
    ids = dict(bos_token_id=lookup('<|endoftext|>'), eos_token_id=lookup('<|endoftext|>'))
  elif family == 'qwen3_moe':  # Qwen3-30B-A3B's eos is <|im_end|>
    ids = dict(bos_token_id=lookup('<|endoftext|>'), eos_token_id=lookup('<|im_end|>'))
  elif family == 'gpt_oss':
    ids = dict(eos_token_id=lookup('<|return|>'), pad_token_id=lookup('<|endoftext|>'))
  else:
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  return {k: v for k, v in ids.items() if k in hub}


def _vocab_size(tokenizer) -> int:
  """The model's vocabulary: the tokenizer's padded to a multiple of 64, as the hub's are."""
  return -(-len(tokenizer) // 64) * 64


def _reference(family: str, directory: str, hub: dict, model=None) -> dict:
  """transformers' outputs after loading `directory` (its config.json as written), or of
  `model` (MXFP4 experts: loading them needs `accelerate`, which the scratch venv has not)."""
  if model is not None:
    model = model.eval()
  elif family == 'switch_transformers':
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32).eval()
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation='eager').eval()
  ids = lambda seed: torch.randint(3, len(transformers.AutoTokenizer.from_pretrained(directory)),
                                   (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))
  inputs = ids(0)
  out = {'input_ids': inputs.numpy().astype(np.int32)}
  with torch.no_grad():
    if family == 'switch_transformers':
      routers = []
      hooks = [m.register_forward_hook(lambda m, a, o: routers.append((o[0], o[2])))
               for name, m in model.named_modules() if name.endswith('mlp.router')]
      decoder_inputs = ids(1)
      result = model(input_ids=inputs, decoder_input_ids=decoder_inputs)
      for hook in hooks:
        hook.remove()
      experts = model.config.num_experts
      probs = torch.stack([torch.softmax(r.float(), -1).reshape(-1, experts) for _, r in routers])
      dropped = torch.stack([m.reshape(-1, experts).sum(-1) == 0 for m, _ in routers])
      out.update(decoder_input_ids=decoder_inputs.numpy().astype(np.int32),
                 dropped=dropped.numpy(), k=np.int32(1))
    else:
      result, logits = router_logits(model, inputs)
      probs = torch.stack([torch.softmax(r.float(), -1) for r in logits])
      out['k'] = np.int32(hub['num_experts_per_tok'])
  k = int(out['k'])
  top = torch.sort(probs, -1, descending=True).values
  out.update(logits=result.logits.float().numpy(), router_probs=probs.numpy(),
             experts=torch.topk(probs, k, -1).indices.numpy(),
             margin=np.float32((top[..., k - 1] - top[..., k]).min()))
  return out


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
  """MXFP4 blocks [E, OUT, IN / 32, 16] and scales [E, OUT, IN / 32] (uint8) of a weight
  [E, IN, OUT], as gpt-oss stores its experts: per 32 inputs a power of two 2^(scale - 127), the
  smallest that brings the block within the codes' +-6, and each input's nearest code (two a
  byte, the first in the low nibble)."""
  blocks = weight.transpose(1, 2).reshape(*weight.shape[::2], -1, 32)  # [E, OUT, G, 32]
  peak = blocks.abs().amax(-1).clamp(min=2.0 ** -100)
  exponent = torch.ceil(torch.log2(peak / 6.0))  # Shape: [E, OUT, G]
  codes = (blocks / torch.exp2(exponent)[..., None]).unsqueeze(-1)
  codes = (codes - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)  # [E, OUT, G, 32]
  return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def _quantize_experts(model, directory: str) -> dict:
  """Store the experts' gate_up_proj and down_proj as MXFP4 in `directory` and put their
  dequantization by transformers' own `convert_moe_packed_tensors` into `model`; returns those
  dequantized weights (float32, `dequantized/<name>`) for reference.npz."""
  path = os.path.join(directory, 'model.safetensors')
  tensors = {name: p.detach().contiguous() for name, p in model.state_dict().items()}
  dequantized = {}
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith(('experts.gate_up_proj', 'experts.down_proj')):
        blocks, scales = quantize_mxfp4(param.data)
        del tensors[name]
        tensors[f'{name}_blocks'], tensors[f'{name}_scales'] = blocks, scales
        param.copy_(convert_moe_packed_tensors(blocks, scales).float())
        dequantized[f'dequantized/{name}'] = param.numpy().copy()
  save_file(tensors, path, metadata={'format': 'pt'})
  return dequantized


def make(name: str, family: str, hub: dict, out: str) -> None:
  directory = os.path.join(out, name)
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  tokenizer = _tokenizer(family, directory)
  hub = {**hub, 'vocab_size': _vocab_size(tokenizer), **_special_ids(family, hub, tokenizer)}
  for extra in ('tokenizer_config.json', 'generation_config.json', 'special_tokens_map.json'):
    published = os.path.join(PUBLISHED, name.split('__dense')[0], extra)
    if os.path.exists(published) and family == 'mixtral':  # its ids are the small tokenizer's
      shutil.copyfile(published, os.path.join(directory, extra))
  config_class = FAMILY_CLASSES[family]
  for seed in range(200):
    torch.manual_seed(seed)
    init = {'initializer_range': 0.2} if family != 'switch_transformers' else {}
    config = config_class.from_dict({**hub, **init})
    model_class = (transformers.SwitchTransformersForConditionalGeneration
                   if family == 'switch_transformers' else transformers.AutoModelForCausalLM)
    model = (model_class(config) if family == 'switch_transformers'
             else model_class.from_config(config, attn_implementation='eager'))
    model.save_pretrained(directory, safe_serialization=True)
    dequantized = _quantize_experts(model, directory) if 'quantization_config' in hub else {}
    with open(os.path.join(directory, 'config.json'), 'w') as f:
      json.dump(hub, f, indent=2)  # the published fields, as published (sizes shrunk)
    reference = {**_reference(family, directory, hub, model if dequantized else None),
                 **dequantized}
    drops = family != 'switch_transformers' or 0 < reference['dropped'].sum()
    if reference['margin'] >= MIN_MARGIN and drops:
      break
  else:
    raise SystemExit(f'{name}: no seed below 200 gives router margins >= {MIN_MARGIN}')
  auto = transformers.AutoTokenizer.from_pretrained(directory)
  for i, text in enumerate(TEXTS):
    reference[f'texts_ids_{i}'] = np.asarray(auto(text, add_special_tokens=False).input_ids,
                                             np.int32)
    reference[f'texts_ids_special_{i}'] = np.asarray(auto(text).input_ids, np.int32)
  np.savez_compressed(os.path.join(directory, 'reference.npz'), **reference)
  print(f'{name}: seed {seed}, margin {reference["margin"]:.2e}, '
        f'{sum(p.numel() for p in model.parameters())} parameters -> {directory}')


def reference_fields(out: str) -> None:
  fields = {}
  for family, config_class in FAMILY_CLASSES.items():
    params = inspect.signature(config_class.__init__).parameters.items()
    fields[family] = {k: v.default for k, v in params if k not in ('self', 'kwargs')}
  with open(os.path.join(out, 'reference_config_fields.json'), 'w') as f:
    json.dump(fields, f, indent=2, sort_keys=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('out')
  parser.add_argument('--only', nargs='*', default=None)
  args = parser.parse_args()
  assert transformers.__version__ == '4.57.6', transformers.__version__
  os.makedirs(args.out, exist_ok=True)
  reference_fields(args.out)
  jobs = {name: (family, {**_published(name), **shrink})
          for name, (family, shrink) in CHECKPOINTS.items()}
  for name, (base, change) in VARIANTS.items():
    family, hub = jobs[base]
    jobs[name] = (family, {**hub, **change})
  for name, (family, hub) in jobs.items():
    if args.only is None or name in args.only:
      make(name, family, hub, args.out)


if __name__ == '__main__':
  main()
