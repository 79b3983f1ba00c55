"""`moejax import-hf SOURCE --workdir W`: a hub checkpoint as a moejax run at step 0; `moejax
export-hf --workdir W --out DIR`: a run's checkpoint as a hub directory.

The work directory then holds what `moejax train` would have written: config.json (the imported
model's fields in the `model` section, everything else from `--config FILE` or the defaults, then
the command line's overrides), the checkpoint's tokenizer files in tokenizer/ (the run's
`data.tokenizer='hub'`), and an Orbax checkpoint at step 0 with the imported params and a fresh
optimizer state. `moejax eval | sample | analyze` read it like any run; `moejax train
--workdir W --config.data.source=...` fine-tunes it on other data. The params are placed on the
run's mesh one array at a time (`--config.mesh.expert=8` shards the experts), straight from the
host copy of the import, in the checkpoint's dtype (the imported `model.param_dtype`; an override
`--config.model.param_dtype=float32` casts a bfloat16 checkpoint up). The family imported is
recorded in <workdir>/imported_from.json, the default of an export.

An export restores the run's checkpoint as `moejax eval` does and writes it with `to_hf`: shards
of at most `--max-shard-size` (the hub's units: 5GB is 5 * 10^9 bytes) with their index, the
run's tokenizer files when it has the hub's (`data.tokenizer='hub'`), and config.json.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax
import numpy as np

from moejax.balancing import BIAS_COLLECTION
from moejax.convert.hf import FAMILIES, copy_tokenizer, from_hf_variables, hub_model_type, to_hf
from moejax.errors import InputError

IMPORTED = 'imported_from.json'  # {'source': hub directory, 'model_type': its family}
SIZE_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12}


def import_hf(source: str, workdir: str, config_file: str | None,
              overrides: list[tuple[str, str]]) -> dict:
  """Import `source` into `workdir`; what was imported (family, parameters, the checkpoint)."""
  from moejax.train import config as config_lib
  from moejax.train.run import open_run
  model, variables = from_hf_variables(source)
  params = variables.pop('params')
  model_type = hub_model_type(source)
  config = (config_lib.config_from_file(config_file) if config_file
            else config_lib.default_config())
  config.model.update(model.to_dict())
  if model.kind == 'encoder_decoder':  # T5's objective: what Switch was trained on
    config.task = 'span_corruption'
  tokenizer = copy_tokenizer(source, os.path.join(workdir, 'tokenizer'))
  if tokenizer:  # the checkpoint's own; an override may still choose another
    config.data.update(tokenizer='hub', tokenizer_path=tokenizer)
  config = config_lib.apply_overrides(config, overrides)
  config_lib.check_config(config)
  run = open_run(config, workdir)
  if run.checkpoints.step_dirs():
    raise InputError(f'{run.checkpoints.directory} already holds checkpoints; import into a new '
                     '--workdir')
  state = run.fresh_state()
  state = state.replace(params=_placed(params, state.params))
  if BIAS_COLLECTION in variables:  # DeepSeek-V3's correction biases: the balancing biases
    fresh = state.balancing_bias_state  # its 'load' beside each bias starts at zero
    state = state.replace(balancing_bias_state=_placed(
        _merged(variables[BIAS_COLLECTION], fresh), fresh))
  run.checkpoints.save(state, None, force=True)
  if jax.process_index() == 0:
    config_lib.write_saved_config(config, workdir)
    with open(os.path.join(workdir, IMPORTED), 'w') as f:
      json.dump({'source': os.path.abspath(source), 'model_type': model_type}, f, indent=1)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {'source': source, 'workdir': workdir, 'model_type': model_type, 'parameters': count,
          'checkpoint': run.checkpoints.directory, 'step': 0}


def export_hf(workdir: str, out: str, config, step: int | None, max_shard_size: str | None,
              model_type: str | None) -> dict:
  """Write the run's checkpoint `step` (default: the newest complete one) of `config` into
  `out`, a new or empty directory, as a hub checkpoint of `model_type` (default: the family the
  run was imported from); what was written."""
  from moejax.train.resume import load
  if os.path.isdir(out) and os.listdir(out):
    raise InputError(f'--out {out} is not empty; export into a new or an empty directory')
  model_type = model_type or imported_model_type(workdir)
  if model_type is None:
    raise InputError(f'{workdir} was not imported from the hub (no {IMPORTED}): pass '
                     f'--model-type ({", ".join(FAMILIES)})')
  if model_type not in FAMILIES:
    raise InputError(f'--model-type {model_type!r} is not one moejax exports '
                     f'({", ".join(FAMILIES)})')
  max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
  run, state = load(config, workdir, step)
  run.checkpoints.close()
  tokenizer = None
  if config.data.tokenizer == 'hub':  # a hub directory, or a tokenizer.json among its files
    path = config.data.tokenizer_path
    tokenizer = path if os.path.isdir(path) else os.path.dirname(path)
  files = to_hf(run.model_config, state.params, out, model_type, max_bytes, tokenizer,
                _exported_state(state.balancing_bias_state))
  return {'workdir': workdir, 'step': int(jax.device_get(state.step)), 'out': out,
          'model_type': model_type, 'files': files, 'tokenizer': tokenizer}


def imported_model_type(workdir: str) -> str | None:
  """The family the run in `workdir` was imported from; None when it was not."""
  path = os.path.join(workdir, IMPORTED)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)['model_type']
  except (ValueError, KeyError, TypeError) as error:
    raise InputError(f'{path} is damaged ({error!r}): pass --model-type') from None


def parse_size(text: str) -> int:
  """Bytes of a shard size as the hub writes it: '500MB', '5GB' (powers of 1000, any case, a
  fraction allowed), or a number of bytes."""
  match = re.fullmatch(r'\s*(\d+(?:\.\d*)?)\s*((?:[kmgt]?b)?)\s*', text, re.IGNORECASE)
  size = int(float(match[1]) * SIZE_UNITS[match[2].upper()]) if match else 0
  if size < 1:
    raise InputError(f'--max-shard-size {text!r} is not a size: a number of bytes, or of KB, MB, '
                     'GB or TB (5GB: 5 * 10^9 bytes)')
  return size


def _exported_state(bias_state) -> dict | None:
  """The STATE_COLLECTIONS a run exports: its balancing biases, without the load each layer
  records beside its bias (no checkpoint holds it); None without balancing biases."""
  if not bias_state:
    return None
  biases = lambda tree: ({'bias': tree['bias']} if 'bias' in tree
                         else {key: biases(value) for key, value in tree.items()})
  return {BIAS_COLLECTION: biases(bias_state)}


def _merged(imported: Mapping, fresh: Mapping) -> dict:
  """`fresh`'s tree with `imported`'s arrays in their places, its own elsewhere."""
  return {key: (_merged(imported.get(key, {}), value) if isinstance(value, Mapping)
                else imported.get(key, value)) for key, value in fresh.items()}


def _placed(imported: dict, fresh):
  """The imported arrays on the fresh params' (or biases') devices and shardings, in their
  dtypes (the config's: no cast unless an override changed `param_dtype`); InputError naming
  the first parameter whose shape the config changed (an override of a model field)."""
  def place(path, new, like):
    if np.shape(new) != like.shape:
      raise InputError(f'imported parameter {jax.tree_util.keystr(path)} is {list(np.shape(new))}'
                       f' but the config makes it {list(like.shape)}: a --config.model override '
                       'changed the architecture')
    return jax.device_put(np.asarray(new, like.dtype), like.sharding)
  try:
    return jax.tree_util.tree_map_with_path(place, imported, fresh)
  except ValueError as error:  # another tree: a layout override (moe_every, scan_layers, ...)
    raise InputError(f'the imported parameters do not fit the config ({error})') from None
