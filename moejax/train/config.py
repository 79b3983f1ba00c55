"""Experiment configs: defaults for every field, and the ModelConfig a run builds from them.

An experiment is a Python file whose `get_config()` returns `default_config()` with its own values
(see experiments/configs/); every field can be overridden on the command line
(`--config.model.num_experts=16`, `--config.model.eval_capacity_factor=None`): `apply_overrides`.
`check_config` checks a config when it is built, naming the field of any error.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os

import ml_collections

from moejax.errors import ConfigError, InputError
from moejax.data.tokenizers import TOKENIZERS
from moejax.models import ModelConfig
from moejax.train.optim import OPTIMIZERS, SCHEDULES, make_optimizer

TASKS = {'lm': 'decoder', 'span_corruption': 'encoder_decoder'}  # task -> the model.kind it needs


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0                    # params init, dropout/jitter/gating rngs, data order
  config.task = 'lm'                 # 'lm' (decoder) or 'span_corruption' (encoder-decoder)

  config.model = ml_collections.ConfigDict(
      {k: v for k, v in ModelConfig(vocab_size=1).to_dict().items() if k != 'vocab_size'})
  # V; None: the tokenizer's (and span corruption's sentinels). An imported model sets its own.
  config.model.vocab_size = ml_collections.config_dict.placeholder(int)
  # The decoder's first input; None: the tokenizer's (`Tokenizer.start_id`). An import sets it.
  config.model.decoder_start_id = ml_collections.config_dict.placeholder(int)

  config.data = ml_collections.ConfigDict(dict(
      source='data/tinyshakespeare.txt',  # a local file/directory, or a TFDS name ('lm1b')
      data_dir=ml_collections.config_dict.placeholder(str),  # TFDS data_dir (None: TFDS default)
      text_key='text', train_split='train', eval_split='validation',
      validation_fraction=0.1,           # local text: the last 10% of each file is validation
      tokenizer='bytes',                 # or 'sentencepiece', or 'hub' (tokenizer_path)
      tokenizer_path=ml_collections.config_dict.placeholder(str),  # a hub dir or tokenizer.json
      spm_model=ml_collections.config_dict.placeholder(str),  # a .model file; None: train one
      spm_vocab_size=1024,
      length=128,                        # L: packed example length
      noise_density=0.15, mean_span_length=3.0, num_sentinels=100,  # span corruption (T5)
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=32, num_steps=600,
      optimizer='adamw',                 # or 'adafactor'
      learning_rate=3e-3, schedule='cosine',  # 'cosine', 'rsqrt' (T5) or 'constant'
      warmup_steps=50, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip_norm=1.0,
      load_balancing_loss_coef=1e-2,     # alpha (Switch)
      router_z_loss_coef=1e-3,           # beta (ST-MoE)
      max_nonfinite_in_a_row=10,         # skipped updates in a row before the run stops
      log_every=1,
  ))

  config.eval = ml_collections.ConfigDict(dict(
      batch_size=32, every_steps=200,
      max_batches=ml_collections.config_dict.placeholder(int),  # None: the whole split
  ))

  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=3))

  # Sparse upcycling (moejax.upcycle): a new run starts from a dense run's checkpoint.
  config.upcycle = ml_collections.ConfigDict(dict(
      from_workdir=ml_collections.config_dict.placeholder(str),  # the dense run; None: off
      step=ml_collections.config_dict.placeholder(int),          # its checkpoint (None: latest)
      noise_std=0.0,                     # expert noise, relative to each kernel's std
  ))

  config.mesh = ml_collections.ConfigDict(dict(data=1, expert=1, model=1))

  config.sample = ml_collections.ConfigDict(dict(
      prompt='\n', num_tokens=300, temperature=0.8))
  return config


def config_from_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of an experiment file (what `moejax train --config path` runs); InputError
  when the file is missing, a directory, not Python, or has no get_config() returning a config."""
  module = load_python_file(path, 'experiment_config', 'an experiment config file')
  if not callable(getattr(module, 'get_config', None)):
    raise InputError(f'{path} has no get_config() function')
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise InputError(f'{path}: get_config() returned {type(config).__name__}, not a ConfigDict')
  return config


def load_python_file(path: str, module_name: str, what: str):
  """The module a Python file defines, run; InputError naming the file when it is missing, a
  directory, unreadable, or not valid Python (errors its code raises are its own)."""
  if os.path.isdir(path):
    raise InputError(f'{path} is a directory; it must be {what} (.py)')
  if not os.path.isfile(path):
    raise InputError(f'no {what} {path}')
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as error:
    raise InputError(f'{path} line {error.lineno} is not valid Python: {error.msg}') from None
  except (OSError, UnicodeDecodeError) as error:
    raise InputError(f'cannot read {path}: {error}') from None
  return module


def parse_value(text: str):
  """A command-line value: a Python literal (3, 1e-3, True, None, 'text', (1, 2)), else the text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
  """`config` with each (dotted field path, value text) set: ('model.top_p', '0.5').

  The field must exist; 'None' sets it to None; a value is converted to the field's type (an int
  for a float field, any text for a string field); a field whose default is None takes the
  literal's type. A wrong type is a ConfigError naming the field.
  """
  for path, text in overrides:
    *sections, field = path.split('.')
    owner, node = 'config', config
    for section in sections:
      if section not in node or not isinstance(node[section], ml_collections.ConfigDict):
        raise ConfigError(section, text, 'no such config section', owner)
      owner, node = section if owner == 'config' else f'{owner}.{section}', node[section]
    if field not in node:
      raise ConfigError(field, text, f'no such field; {owner} has {sorted(node.keys())}', owner)
    value = _typed(node[field], parse_value(text), text)
    try:
      if value is _MISMATCH:
        raise TypeError
      node[field] = value
    except (TypeError, ValueError):
      expected = node.get_ref(field).get_type().__name__
      raise ConfigError(field, parse_value(text), f'it must be {expected}', owner) from None
  return config


_MISMATCH = object()


def _typed(current, value, text: str):
  """`value` in the type of the field's `current` value (a field now None: as parsed), or
  _MISMATCH."""
  if value is None or current is None:
    return value
  if isinstance(current, str):
    return value if isinstance(value, str) else text  # 'x' (quoted) or x
  if isinstance(current, bool) or isinstance(value, bool):
    return value if isinstance(current, bool) and isinstance(value, bool) else _MISMATCH
  if isinstance(current, float) and isinstance(value, int):
    return float(value)
  return value if isinstance(value, type(current)) else _MISMATCH


def _integer(low: int, none_ok: bool = False):
  return (lambda v: (v is None and none_ok) or (isinstance(v, int) and not isinstance(v, bool)
                                                and v >= low),
          f'it must be an integer >= {low}' + (', or None' if none_ok else ''))


def _number(test, text: str, none_ok: bool = False):
  return (lambda v: (v is None and none_ok) or (isinstance(v, (int, float))
                                                and not isinstance(v, bool) and test(v)),
          f'it must be a number {text}' + (', or None' if none_ok else ''))


# The range of every numeric field outside `model` (ModelConfig and MoeLayer check their own).
RANGES = {
    'seed': (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
             'it must be an integer in [0, 2**32) (the data shuffle\'s seed)'),
    'data.length': _integer(2), 'data.spm_vocab_size': _integer(8),
    'data.num_sentinels': _integer(1),
    'data.validation_fraction': _number(lambda v: 0 < v < 1, 'in (0, 1)'),
    'data.noise_density': _number(lambda v: 0 < v < 1, 'in (0, 1)'),
    'data.mean_span_length': _number(lambda v: v >= 1, '>= 1'),
    'train.batch_size': _integer(1), 'train.num_steps': _integer(1),
    'train.learning_rate': _number(lambda v: v > 0, '> 0'),
    'train.warmup_steps': _integer(0),
    'train.weight_decay': _number(lambda v: v >= 0, '>= 0'),
    'train.b1': _number(lambda v: 0 <= v < 1, 'in [0, 1)'),
    'train.b2': _number(lambda v: 0 <= v < 1, 'in [0, 1)'),
    'train.grad_clip_norm': _number(lambda v: v > 0, '> 0'),
    'train.load_balancing_loss_coef': _number(lambda v: v >= 0, '>= 0'),
    'train.router_z_loss_coef': _number(lambda v: v >= 0, '>= 0'),
    'train.max_nonfinite_in_a_row': _integer(1), 'train.log_every': _integer(1),
    'eval.batch_size': _integer(1), 'eval.every_steps': _integer(1),
    'eval.max_batches': _integer(1, none_ok=True),
    'checkpoint.every_steps': _integer(1), 'checkpoint.keep': _integer(1),
    'upcycle.step': _integer(0, none_ok=True),
    'upcycle.noise_std': _number(lambda v: v >= 0, '>= 0'),
    'mesh.data': _integer(1), 'mesh.expert': _integer(1), 'mesh.model': _integer(1),
    'sample.num_tokens': _integer(1),
    'sample.temperature': _number(lambda v: v >= 0, '>= 0 (0: greedy)'),
}


# The valid values of every string field outside `model` that names a choice (ModelConfig and its
# layers check theirs: kind, positions, routing, dispatch, router, activation, dtypes, ...).
CHOICES = {'task': tuple(TASKS), 'data.tokenizer': TOKENIZERS, 'train.optimizer': OPTIMIZERS,
           'train.schedule': SCHEDULES}


def _owner_and_field(path: str) -> tuple[str, str]:
  section, _, field = path.rpartition('.')
  return section or 'config', field


def check_unknown_fields(config: ml_collections.ConfigDict,
                         reference: ml_collections.ConfigDict | None = None,
                         owner: str = 'config') -> None:
  """A ConfigError for the first field (in any section) that `default_config()` does not have,
  with the closest known names: a misspelt field in an experiment file is not ignored."""
  reference = default_config() if reference is None else reference
  for key, value in config.items():
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference), n=3)
      hint = f'did you mean {" or ".join(close)}? ' if close else ''
      raise ConfigError(key, value, f'no such field; {hint}{owner} has {sorted(reference)}',
                        owner)
    if isinstance(value, ml_collections.ConfigDict) and isinstance(
        reference[key], ml_collections.ConfigDict):
      check_unknown_fields(value, reference[key], key if owner == 'config' else f'{owner}.{key}')


def check_finite(config: ml_collections.ConfigDict, owner: str = 'config') -> None:
  """No field, in any section, is inf or nan: no setting means either."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      check_finite(value, key if owner == 'config' else f'{owner}.{key}')
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(key, value, 'it must be a finite number', owner)


def check_ranges(config: ml_collections.ConfigDict) -> None:
  for path, (test, text) in RANGES.items():
    owner, field = _owner_and_field(path)
    node = config if owner == 'config' else config.get(owner)
    if node is not None and field in node and not test(node[field]):
      raise ConfigError(field, node[field], text, owner)
  for path, choices in CHOICES.items():
    owner, field = _owner_and_field(path)
    node = config if owner == 'config' else config.get(owner)
    if node is not None and field in node and node[field] not in choices:
      raise ConfigError(field, node[field], f'it must be one of {choices}', owner)


def check_mesh(config: ml_collections.ConfigDict, model: ModelConfig) -> None:
  """Mesh sizes against the devices, and against what each axis splits: experts over 'expert',
  expert and FFN hidden units over 'model', batch rows over 'data' x 'expert'."""
  import jax
  mesh = config.mesh
  devices = jax.device_count()
  if mesh.data * mesh.expert * mesh.model > devices:
    raise ConfigError('data', mesh.data, f'mesh.data x mesh.expert x mesh.model = '
                      f'{mesh.data * mesh.expert * mesh.model} exceeds the {devices} devices',
                      'mesh')
  if model.has_sparse_layers and not model.dense_baseline and model.num_experts % mesh.expert:
    raise ConfigError('expert', mesh.expert, f'it must divide model.num_experts='
                      f'{model.num_experts}', 'mesh')
  if model.ffn_dim % mesh.model:
    raise ConfigError('model', mesh.model, f'it must divide model.ffn_dim={model.ffn_dim}',
                      'mesh')
  rows = mesh.data * mesh.expert
  for section in ('train', 'eval'):
    if config[section].batch_size % rows:
      raise ConfigError('batch_size', config[section].batch_size, f'it must be a multiple of '
                        f'mesh.data x mesh.expert = {rows} (the batch is split over both)',
                        section)


def check_group_size(config: ml_collections.ConfigDict, model: ModelConfig) -> None:
  """model.group_size against the batches it will group: train and eval, batch x length tokens
  (the layer's own check sees only the initialization batch)."""
  if model.group_size is None or config.task != 'lm':  # span corruption: the layers check it
    return
  for section in ('train', 'eval'):
    tokens = config[section].batch_size * config.data.length
    if tokens % model.group_size:
      raise ConfigError('group_size', model.group_size, f'it must divide the {section} batch\'s '
                        f'{section}.batch_size x data.length = {tokens} tokens', 'model')


def check_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The model config a run would build (vocabulary size 1 until the data sets it), after
  checking every section, so that a bad field fails here, before any data or compilation, with
  the field named (`model.top_p=...`, `train.learning_rate=...`, `mesh.expert=...`): unknown
  fields, finite numbers, ranges and choices, the optimizer, the model and its layers, the mesh, the group size."""
  check_unknown_fields(config)
  check_finite(config)
  check_ranges(config)
  make_optimizer(config.train)
  model = model_config(config, vocab_size=1)
  check_mesh(config, model)
  check_group_size(config, model)
  return model


def absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with its local paths absolute (data source, vocabulary, TFDS and upcycling
  directories), so a saved run evaluates and samples from any directory."""
  fields = (('data', 'source'), ('data', 'spm_model'), ('data', 'tokenizer_path'),
            ('data', 'data_dir'), ('upcycle', 'from_workdir'))
  for section, field in fields:
    if section in config and config[section].get(field):
      path = config[section][field]
      if section != 'data' or field != 'source' or os.path.exists(path):  # else a TFDS name
        config[section][field] = os.path.abspath(path)
  return config


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its config.json)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise InputError(f'--workdir {workdir} is a file; it must be a run directory')
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise InputError(f'no {path}: not a run directory (train first)')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except ValueError as error:
    raise InputError(f'{path} is not valid JSON ({error}); it is written atomically, so it was '
                     'edited or damaged: restore it, or pass --config FILE') from None
  except OSError as error:
    raise InputError(f'cannot read {path}: {error.strerror or error}') from None


def write_saved_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """<workdir>/config.json (paths absolute), written atomically: a crash leaves the old one."""
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(absolute_paths(config.copy_and_resolve_references()).to_json(indent=2))
  os.replace(path + '.tmp', path)


def model_config(config: ml_collections.ConfigDict, vocab_size: int,
                 start_id: int = 0) -> ModelConfig:
  """The run's ModelConfig: config.model with the data's vocabulary size `vocab_size` (or
  `model.vocab_size` when set: at least the data's, e.g. an imported model's) and the tokenizer's
  decoder start id `start_id` (or `model.decoder_start_id` when set)."""
  if config.model.vocab_size is not None:
    if config.model.vocab_size < vocab_size:
      raise ConfigError('vocab_size', config.model.vocab_size, f'the data needs {vocab_size} ids '
                        f'(tokenizer {config.data.tokenizer!r})', 'model')
    vocab_size = config.model.vocab_size
  if config.task not in TASKS:
    raise ConfigError('task', config.task, f'it must be one of {tuple(TASKS)}', 'config')
  if config.model.kind != TASKS[config.task]:
    raise ConfigError('kind', config.model.kind, f'task={config.task!r} needs '
                      f'model.kind={TASKS[config.task]!r}', 'model')
  start = config.model.get('decoder_start_id')
  return ModelConfig.from_dict({**config.model.to_dict(), 'vocab_size': vocab_size,
                                'decoder_start_id': start_id if start is None else start})
