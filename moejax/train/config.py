"""Experiment configs: defaults for every field, and the ModelConfig a run builds from them.

An experiment is a Python file whose `get_config()` returns `default_config()` with its own values
(see experiments/configs/); every field can be overridden on the command line
(`--config.model.num_experts=16`, `--config.model.eval_capacity_factor=None`): `apply_overrides`.
`check_config` checks a config when it is built, naming the field of any error.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os

import ml_collections

from moejax.checks import ConfigError
from moejax.models import ModelConfig
from moejax.train.optim import make_optimizer


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0                    # params init, dropout/jitter/gating rngs, data order
  config.task = 'lm'                 # 'lm' (decoder) or 'span_corruption' (encoder-decoder)

  config.model = ml_collections.ConfigDict(
      {k: v for k, v in ModelConfig(vocab_size=1).to_dict().items() if k != 'vocab_size'})

  config.data = ml_collections.ConfigDict(dict(
      source='data/tinyshakespeare.txt',  # a local file/directory, or a TFDS name ('lm1b')
      data_dir=ml_collections.config_dict.placeholder(str),  # TFDS data_dir (None: TFDS default)
      text_key='text', train_split='train', eval_split='validation',
      validation_fraction=0.1,           # local text: the last 10% of each file is validation
      tokenizer='bytes',                 # or 'sentencepiece'
      spm_model=ml_collections.config_dict.placeholder(str),  # a .model file; None: train one
      spm_vocab_size=1024,
      length=128,                        # L: packed example length
      shuffle_buffer=10_000,
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
  """`get_config()` of an experiment file (what `moejax train --config path` runs)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no experiment config file {path}')
  spec = importlib.util.spec_from_file_location('experiment_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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


def check_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The model config a run would build (vocabulary size 1 until the data sets it), after
  building its optimizer and checking its mesh, so that a bad field fails here, before any data or
  compilation, with the field named (`model.top_p=...`, `train.schedule=...`)."""
  make_optimizer(config.train)
  for axis in ('data', 'expert', 'model'):
    size = config.mesh[axis]
    if not isinstance(size, int) or size < 1:
      raise ConfigError(axis, size, 'it must be an integer >= 1', 'mesh')
  return model_config(config, vocab_size=1)


def absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with its local paths absolute (data source, vocabulary, TFDS and upcycling
  directories), so a saved run evaluates and samples from any directory."""
  fields = (('data', 'source'), ('data', 'spm_model'), ('data', 'data_dir'),
            ('upcycle', 'from_workdir'))
  for section, field in fields:
    if section in config and config[section].get(field):
      path = config[section][field]
      if section != 'data' or field != 'source' or os.path.exists(path):  # else a TFDS name
        config[section][field] = os.path.abspath(path)
  return config


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no {path}: not a run directory (train first)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The run's ModelConfig: config.model plus the vocabulary size of the data."""
  expected_kind = {'lm': 'decoder', 'span_corruption': 'encoder_decoder'}
  if config.task not in expected_kind:
    raise ConfigError('task', config.task, f'it must be one of {tuple(expected_kind)}', 'config')
  if config.model.kind != expected_kind[config.task]:
    raise ConfigError('kind', config.model.kind, f'task={config.task!r} needs '
                      f'model.kind={expected_kind[config.task]!r}', 'model')
  return ModelConfig.from_dict({**config.model.to_dict(), 'vocab_size': vocab_size})
