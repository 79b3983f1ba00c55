"""Does transformers load moejax's sharded exports? For each fixture of tests/fixtures/hf (the four
families' and the published configs'), moejax (the repository's .venv, in a subprocess) imports it
and exports it with `to_hf` in shards of at most a fifth of its bytes, with its tokenizer; then
transformers 4.57.6 loads the original and the export the same way and this checks:
  logits     equal on the fixture's reference inputs (its input_ids, and decoder_input_ids for
             Switch), bit for bit, once each model's tensors are copied out of the files' memory
             maps (torch's CPU kernels round by the data's alignment: the Switch models, loaded
             from two copies of the same bytes at other offsets, differ by 1.3e-6 as mapped, as
             the printed "mapped" column shows);
  loading    no missing, unexpected or mismatched tensor;
  index      model.safetensors.index.json's metadata (total_size, total_parameters) and tensor
             names equal those of transformers' own save_pretrained, at the same max_shard_size,
             of the original loaded in its own dtype (which tensors share a file may differ:
             moejax writes in its families' tables' order, transformers in its modules');
  tokenizer  AutoTokenizer's ids of tools/make_published_fixtures.py's texts, with and without
             special tokens, and its special tokens, equal.
One fixture also goes through the command line: `moejax import-hf`, then `moejax export-hf
--max-shard-size 40KB`. Not run by `make test` (it needs torch):

  /tmp/hf/bin/python tools/check_hf_export.py | tee tests/fixtures/hf/published/EXPORT_CHECK.txt

Exits 1 when any check fails.
"""
import datetime
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, '.venv', 'bin')
HF = os.path.join(REPO, 'tests', 'fixtures', 'hf')
PUBLISHED = os.path.join(HF, 'published')
CLI_FIXTURE = os.path.join(PUBLISHED, 'mistralai__Mixtral-8x7B-v0.1')
TEXTS = ('The quick brown fox, 42 times.', 'Thé café à Noël: déjà vu.', '東京は晴れです。',
         'Rocket 🚀 and snake 🐍!')  # tools/make_published_fixtures.py's
INDEX = 'model.safetensors.index.json'
EXPORT = """
import json, sys
from moejax.convert import from_hf_variables, to_hf
from moejax.convert.hf import hub_model_type
source, out, limit, tokenizer = json.loads(sys.argv[1])
config, variables = from_hf_variables(source)  # DeepSeek-V3's correction biases too
params = variables.pop('params')
to_hf(config, params, out, hub_model_type(source), limit, tokenizer, variables)
"""


def _fixtures() -> list[str]:
  families = [os.path.join(HF, f)
              for f in ('mixtral', 'olmoe', 'qwen2_moe', 'switch_transformers')]
  return families + sorted(os.path.join(PUBLISHED, d) for d in os.listdir(PUBLISHED)
                           if os.path.isdir(os.path.join(PUBLISHED, d)))


def _bytes(source: str) -> int:
  """The tensor bytes of a fixture's model.safetensors (from its header)."""
  with open(os.path.join(source, 'model.safetensors'), 'rb') as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
  header.pop('__metadata__', None)
  return sum(end - begin for begin, end in (e['data_offsets'] for e in header.values()))


def _has_tokenizer(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, f))
             for f in ('tokenizer.json', 'spiece.model', 'tokenizer.model'))


def _load(directory: str, dtype=torch.float32):
  """(model, loading info) as make_published_fixtures.py loads its fixtures."""
  with open(os.path.join(directory, 'config.json')) as f:
    switch = json.load(f)['model_type'] == 'switch_transformers'
  if switch:
    return transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        directory, dtype=dtype, output_loading_info=True)
  return transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=dtype, attn_implementation='eager', output_loading_info=True)


def _copied(model):
  """`model` with its tensors copied out of the memory-mapped files into fresh memory."""
  with torch.no_grad():
    for tensor in (*model.parameters(), *model.buffers()):
      tensor.data = tensor.data.clone()
  return model


def _logits(model, reference: dict) -> np.ndarray:
  inputs = {'input_ids': torch.from_numpy(reference['input_ids'].astype(np.int64))}
  if 'decoder_input_ids' in reference:
    inputs['decoder_input_ids'] = torch.from_numpy(reference['decoder_input_ids'].astype(np.int64))
  with torch.no_grad():
    return model.eval()(**inputs).logits.float().numpy()


def _tokenizer_problems(source: str, out: str) -> list[str]:
  a, b = (transformers.AutoTokenizer.from_pretrained(d) for d in (source, out))
  problems = [] if a.special_tokens_map == b.special_tokens_map else ['special tokens differ']
  for text in TEXTS:
    for special in (False, True):
      ids = [t(text, add_special_tokens=special).input_ids for t in (a, b)]
      if ids[0] != ids[1]:
        problems.append(f'ids of {text!r} (special tokens: {special}) differ')
  return problems


def _index_problems(source: str, out: str, limit: int) -> tuple[list[str], bool]:
  """(problems, whether the files hold the same tensors) of the export's index against
  transformers' save_pretrained at `limit` of `source` loaded in its own dtype."""
  with tempfile.TemporaryDirectory() as saved:
    _load(source, 'auto')[0].save_pretrained(saved, max_shard_size=limit)
    with open(os.path.join(saved, INDEX)) as f:
      theirs = json.load(f)
  with open(os.path.join(out, INDEX)) as f:
    ours = json.load(f)
  problems = []
  if ours['metadata'] != theirs['metadata']:
    problems.append(f'metadata {ours["metadata"]} where transformers writes {theirs["metadata"]}')
  if sorted(ours['weight_map']) != sorted(theirs['weight_map']):
    problems.append('tensor names differ from transformers\'')
  return problems, ours['weight_map'] == theirs['weight_map']


def check(source: str, out: str, limit: int) -> bool:
  """Print one fixture's line; whether every check passed."""
  reference = dict(np.load(os.path.join(source, 'reference.npz')))
  original, _ = _load(source)
  exported, info = _load(out)
  mapped = float(np.abs(_logits(original, reference) - _logits(exported, reference)).max())
  diff = float(np.abs(_logits(_copied(original), reference)
                      - _logits(_copied(exported), reference)).max())
  problems = [f'{kind}: {keys}' for kind, keys in info.items() if keys]
  if diff != 0:
    problems.append(f'logits differ by up to {diff:.3g}')
  index, same_files = _index_problems(source, out, limit)
  problems += index
  tokenizer = 'no tokenizer'
  if _has_tokenizer(source):
    found = _tokenizer_problems(source, out)
    problems += found
    tokenizer = 'tokenizer ids equal' if not found else 'tokenizer ids DIFFER'
  with open(os.path.join(out, INDEX)) as f:
    shards = len(set(json.load(f)['weight_map'].values()))
  name = os.path.relpath(source, HF)
  verdict = 'ok' if not problems else 'FAILED: ' + '; '.join(problems)
  print(f'{name}: {shards} shards of <= {limit} bytes; logits max |diff| {diff:.1e} '
        f'({"bit for bit" if diff == 0 else "not equal"}; mapped {mapped:.1e}); index as '
        f'transformers\' ({"same files" if same_files else "other files"}); {tokenizer}: '
        f'{verdict}', flush=True)
  return not problems


def _run(args: list[str]) -> None:
  result = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
  if result.returncode:
    raise SystemExit(f'{" ".join(args[:2])} failed ({result.returncode}):\n{result.stderr[-3000:]}')


def main() -> int:
  assert transformers.__version__ == '4.57.6', transformers.__version__
  print(f'# {datetime.date.today()}: tools/check_hf_export.py, transformers '
        f'{transformers.__version__}, torch {torch.__version__}', flush=True)
  ok = True
  with tempfile.TemporaryDirectory() as tmp:
    for source in _fixtures():
      out = os.path.join(tmp, os.path.basename(source))
      limit = _bytes(source) // 5
      tokenizer = source if _has_tokenizer(source) else None
      _run([os.path.join(VENV, 'python'), '-c', EXPORT,
            json.dumps([source, out, limit, tokenizer])])
      ok &= check(source, out, limit)
    workdir, out = os.path.join(tmp, 'run'), os.path.join(tmp, 'cli')
    _run([os.path.join(VENV, 'moejax'), 'import-hf', CLI_FIXTURE, '--workdir', workdir,
          f'--config.data.source={os.path.join(REPO, "data", "timemachine.txt")}',
          f'--config.data.data_dir={os.path.join(tmp, "tfds")}', '--config.data.length=32'])
    _run([os.path.join(VENV, 'moejax'), 'export-hf', '--workdir', workdir, '--out', out,
          '--max-shard-size', '40KB'])
    print('moejax import-hf, then export-hf --max-shard-size 40KB, of ', end='')
    ok &= check(CLI_FIXTURE, out, 40_000)
  print('all checks passed' if ok else 'SOME CHECKS FAILED')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
