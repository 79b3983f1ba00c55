"""Published config.json files, sizes shrunk (tests/fixtures/hf/published, made by
tools/make_published_fixtures.py from the files in tools/published/): moejax's import against
transformers 4.57.6 loading the very same file, each family's fields classified, and each fixture's
own tokenizer against AutoTokenizer's ids."""
import json
import os

import numpy as np
import pytest

from helpers import REPO, apply_imported, reference_weights, run_cli
from moejax.convert import from_hf, from_hf_variables
from moejax.convert.hf import FAMILIES, HUB_ACCEPTED
from moejax.data.tokenizers import load_hub_tokenizer
from moejax.errors import InputError

PUBLISHED = os.path.join(REPO, 'tests', 'fixtures', 'hf', 'published')
CHECKPOINTS = sorted(d for d in os.listdir(PUBLISHED)
                     if os.path.isdir(os.path.join(PUBLISHED, d)))
TEXTS = ('The quick brown fox, 42 times.', 'Thé café à Noël: déjà vu.', '東京は晴れです。',
         'Rocket 🚀 and snake 🐍!')  # tools/make_published_fixtures.py's


def _hub(name):
  with open(os.path.join(PUBLISHED, name, 'config.json')) as f:
    return json.load(f)


def _reference(name):
  return dict(np.load(os.path.join(PUBLISHED, name, 'reference.npz')))


def test_a_fixture_for_each_found_published_config():
  found = sorted(d for d in os.listdir(os.path.join(REPO, 'tools', 'published'))
                 if os.path.exists(os.path.join(REPO, 'tools', 'published', d, 'config.json')))
  assert found and set(found) <= set(CHECKPOINTS)


# The fast tier imports one decoder and the Switch-C layout; the slow tier every fixture.
FAST = ('mistralai__Mixtral-8x7B-v0.1', 'google__switch-c-2048')
TIERED = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
          for name in CHECKPOINTS]


@pytest.mark.parametrize('name', TIERED)
def test_imported_published_config_gives_the_reference_outputs(name):
  """Logits to 1e-4, router probabilities and combine weights to 1e-5, the same experts in the
  same order, and for Switch the same choices dropped over capacity."""
  config, variables = from_hf_variables(os.path.join(PUBLISHED, name))
  reference = _reference(name)
  params = variables.pop('params')
  logits, probs, chosen, dropped, weights = apply_imported(config, params, reference, variables)
  np.testing.assert_allclose(logits, reference['logits'], atol=1e-4, rtol=0)
  assert len(probs) == len(reference['router_probs'])
  for layer, expected in enumerate(reference['router_probs']):
    np.testing.assert_allclose(probs[layer], expected, atol=1e-5)
    np.testing.assert_array_equal(chosen[layer], reference['experts'][layer])
    kept = ~dropped[layer]
    np.testing.assert_allclose(weights[layer][kept],
                               reference_weights(config, reference, layer)[kept], atol=1e-5)
  if 'dropped' in reference:
    assert reference['dropped'].any()
    np.testing.assert_array_equal(np.stack(dropped)[..., 0], reference['dropped'])
  else:
    assert not np.any(dropped)


def test_layouts_with_dense_layers_among_sparse_ones():
  """Switch-C: 3 sparse encoder blocks and 2 dense decoder blocks (decoder_sparse_step 0);
  Qwen's variant: block 0 dense by decoder_sparse_step 2, block 1 by mlp_only_layers."""
  switch_c, _ = from_hf(os.path.join(PUBLISHED, 'google__switch-c-2048'))
  assert [switch_c.is_sparse(i) for i in range(3)] == [True] * 3
  assert switch_c.stack_layers(True) == 2
  assert [switch_c.is_sparse(i, True) for i in range(2)] == [False] * 2
  qwen, params = from_hf(os.path.join(PUBLISHED, 'Qwen__Qwen2-57B-A14B__dense_layers'))
  assert [qwen.is_sparse(i) for i in range(4)] == [False, False, False, True]
  assert params['decoder']['unit_0']['block_0']['mlp']['wi']['kernel'].shape == (32, 48)


@pytest.mark.parametrize('name', CHECKPOINTS)
def test_each_fixture_tokenizer_gives_autotokenizers_ids(name):
  tokenizer = load_hub_tokenizer(os.path.join(PUBLISHED, name))
  reference = _reference(name)
  for i, text in enumerate(TEXTS):
    np.testing.assert_array_equal(tokenizer.encode(text), reference[f'texts_ids_{i}'])
    np.testing.assert_array_equal(tokenizer.encode_with_specials(text),
                                  reference[f'texts_ids_special_{i}'])
    assert tokenizer.decode(tokenizer.encode(text)) == text
  # Documents as packed: what AutoTokenizer adds (bos for Mixtral, eos for T5), ended by eos.
  document = tokenizer.document(TEXTS[0])
  special = reference['texts_ids_special_0']
  np.testing.assert_array_equal(document[:len(special)], special)
  assert document[-1] == tokenizer.eos_id


def _fields_of(family: str) -> dict:
  with open(os.path.join(PUBLISHED, 'reference_config_fields.json')) as f:
    return json.load(f)[family]


def _published_fields(family: str) -> set:
  return {k for name in CHECKPOINTS if _hub(name)['model_type'] == family for k in _hub(name)}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_every_field_is_implemented_accepted_or_refused(family):
  """Each field of the family's transformers 4.57.6 config class, and of its published files,
  is in exactly one list; the defaults moejax fills in are the class's."""
  hub_family = FAMILIES[family]
  lists = [set(hub_family.implemented), set(hub_family.accepted) | set(HUB_ACCEPTED),
           set(hub_family.refused)]
  assert all(not (a & b) for i, a in enumerate(lists) for b in lists[i + 1:])
  reference = _fields_of(family)
  unclassified = (set(reference) | _published_fields(family)) - set.union(*lists)
  assert not unclassified, f'{family}: {sorted(unclassified)}'
  for field, value in hub_family.defaults.items():
    if field in reference:  # Qwen's mlp_only_layers None means []
      assert value == reference[field] or (reference[field] is None and value == []), field


def _other_values(value, field):
  """Other valid values of a hub field (a layout field: a few, since two stacks' layouts must
  agree on their dense blocks)."""
  if field.endswith('_sparse_step') or field.startswith('num_sparse_'):
    return [1, 2, 3, 4]
  if field == 'num_key_value_heads':  # half as many still divide the heads
    return [value // 2]
  if isinstance(value, bool):
    return [not value]
  if isinstance(value, int):
    return [value * 2 if value else 1]
  if isinstance(value, float):
    return [value + 0.5]
  if isinstance(value, list) and value and isinstance(value[0], str):  # layer kinds
    return [value[::-1]]
  if isinstance(value, list) and value and isinstance(value[0], int):  # token ids (GLM's eos)
    return [[v + 1 for v in value]]
  if isinstance(value, list):
    return [[0]]
  if isinstance(value, dict):  # rope_scaling
    return [{**value, 'factor': 2 * value['factor']}]
  if field == 'rope_scaling':  # None: add YaRN
    return [{'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 4096}]
  if value is None:
    return [16]
  return [{'float32': 'bfloat16', 'greedy': 'group_limited_greedy'}[value]]


def _read_or_none(family, config):
  try:
    return family.read(config)
  except InputError:
    return None


# A field read only when another is absent (decoder start: bos, else eos; Switch's layout: the
# steps, else the numbers of sparse layers).
PRECEDED_BY = {'eos_token_id': ('bos_token_id',),
               'num_sparse_encoder_layers': ('encoder_sparse_step', 'decoder_sparse_step'),
               'num_sparse_decoder_layers': ('encoder_sparse_step', 'decoder_sparse_step')}
# A field whose change needs another's default (gpt-oss's layer_types names each layer;
# DeepSeek's MLA has as many key heads as query heads).
TIED_TO = {'num_hidden_layers': ('layer_types',), 'num_attention_heads': ('num_key_value_heads',)}
# A field read only with others' values (DeepSeek-V2 reads its groups with group_limited_greedy).
READ_WITH = {'n_group': {'topk_method': 'group_limited_greedy'},
             'topk_group': {'topk_method': 'group_limited_greedy', 'n_group': 8}}


@pytest.mark.parametrize('name', CHECKPOINTS)
def test_each_implemented_field_changes_the_model_and_each_refused_one_is_named(name):
  hub = _hub(name)
  family = FAMILIES[hub['model_type']]
  base = {**family.defaults, **hub}
  for field in family.implemented:
    config = {**base, **{k: None for k in (*PRECEDED_BY.get(field, ()),
                                           *TIED_TO.get(field, ()))},
              **READ_WITH.get(field, {})}
    before = family.read(config)
    others = [_read_or_none(family, {**config, field: value})
              for value in _other_values(config.get(field), field) if value != config.get(field)]
    assert any(other not in (None, before) for other in others), field
  for field, supported in family.refused.items():
    other = 'gelu' if isinstance(supported, str) else _other_values(supported, field)[0]
    with pytest.raises(InputError, match=f'^{family.model_type} checkpoint: {field}=') as error:
      family.read({**hub, field: other})
    assert '\n' not in str(error.value)


@pytest.mark.slow
def test_an_imported_checkpoint_runs_on_text_with_its_own_tokenizer(tmp_path, tfds_dir, capsys):
  """import-hf keeps the checkpoint's tokenizer: eval tokenizes the corpus with it (bos first, as
  Mixtral's documents start), sample stops at its eos, analyze routes several texts."""
  source = os.path.join(PUBLISHED, 'mistralai__Mixtral-8x7B-v0.1')
  workdir = tmp_path / 'run'
  status, _, err = run_cli(
      capsys, 'import-hf', source, '--workdir', workdir,
      f'--config.data.source={os.path.join(REPO, "data", "timemachine.txt")}',
      f'--config.data.data_dir={tfds_dir}', '--config.data.length=32',
      '--config.eval.max_batches=2', '--config.eval.batch_size=8')
  assert status == 0, err
  with open(workdir / 'config.json') as f:
    saved = json.load(f)
  assert saved['data']['tokenizer'] == 'hub'
  assert saved['model']['decoder_start_id'] == 1  # <s>: Mixtral's bos
  assert sorted(os.listdir(workdir / 'tokenizer')) == sorted(
      f for f in os.listdir(source) if f.endswith(('.json', '.model')))
  status, out, err = run_cli(capsys, 'eval', '--workdir', workdir)
  assert status == 0 and np.isfinite(json.loads(out)['nll']), err
  # eval, sample and analyze restore the params (and step, biases), never the optimizer state.
  import jax
  import orbax.checkpoint as ocp
  from moejax.train.config import saved_config
  from moejax.train.resume import load
  _, state = load(saved_config(str(workdir)), str(workdir))
  assert all(leaf is ocp.PLACEHOLDER for leaf in jax.tree.leaves(state.opt_state))
  _, imported = from_hf(source)
  assert (sum(x.nbytes for x in jax.tree.leaves(state.params))
          == sum(x.nbytes for x in jax.tree.leaves(imported)))
  tokenizer = load_hub_tokenizer(str(workdir / 'tokenizer'))
  tokens = [np.load(workdir / 'tokens' / f) for f in os.listdir(workdir / 'tokens')
            if f.endswith('.npy')]
  assert all(t[0] == tokenizer.bos_id and (t == tokenizer.eos_id).any() for t in tokens)
  status, out, err = run_cli(capsys, 'sample', '--workdir', workdir, '--prompt', 'Time',
                             '--num_tokens', '8')
  assert status == 0 and '--- sample' in out, err
  texts = []
  for i, body in enumerate(TEXTS[:2]):
    texts.append(tmp_path / f'text{i}.txt')
    texts[-1].write_text(body * 4)
  status, out, err = run_cli(capsys, 'analyze', '--workdir', workdir, '--text', texts[0],
                             '--text', texts[1], '--out', tmp_path / 'analysis')
  assert status == 0, err
  with open(tmp_path / 'analysis' / 'routing.json') as f:
    report = json.load(f)
  assert list(report['texts']) == ['text0.txt', 'text1.txt']
  first = report['texts']['text0.txt']
  assert first['tokens'] == len(tokenizer.document(TEXTS[0] * 4)) - 1
  for layer in first['layers'].values():
    assert abs(sum(layer['usage']) - 1) < 1e-6 and 0 <= layer['agreement']['same_first'] <= 1
  assert os.path.exists(tmp_path / 'analysis' / 'usage_by_text.png')


def test_an_imported_switch_model_gets_its_own_sentinels():
  """Span corruption of an imported Switch checkpoint hides spans behind the tokenizer's own
  <extra_id_i> (T5's: extra_id_0 the highest), not ids past the model's vocabulary."""
  from moejax import data
  source = os.path.join(PUBLISHED, 'google__switch-base-32')
  config, _ = from_hf(source)
  tokenizer = load_hub_tokenizer(source)
  sentinels = tokenizer.sentinel_ids(100)
  assert sentinels[0] == tokenizer.token_id('<extra_id_0>') == tokenizer.vocab_size - 1
  assert list(sentinels[:3]) == [tokenizer.vocab_size - 1 - i for i in range(3)]
  settings = type('Data', (), {'num_sentinels': 100})
  assert data.model_vocab_size(tokenizer, settings, 'span_corruption') == tokenizer.vocab_size
  assert tokenizer.vocab_size <= config.vocab_size  # the hub pads the vocabulary to 64
  assert tokenizer.start_id('encoder_decoder') == config.decoder_start_id == 0
