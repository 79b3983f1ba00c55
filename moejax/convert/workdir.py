"""`moejax import-hf SOURCE --workdir W`: a hub checkpoint as a moejax run at step 0.

The work directory then holds what `moejax train` would have written: config.json (the imported
model's fields in the `model` section, everything else from `--config FILE` or the defaults, then
the command line's overrides), the checkpoint's tokenizer files in tokenizer/ (the run's
`data.tokenizer='hub'`), and an Orbax checkpoint at step 0 with the imported params and a fresh
optimizer state. `moejax eval | sample | analyze` read it like any run; `moejax train
--workdir W --config.data.source=...` fine-tunes it on other data. The params are placed on the
run's mesh one array at a time (`--config.mesh.expert=8` shards the experts), straight from the
host copy of the import, in the checkpoint's dtype (the imported `model.param_dtype`; an override
`--config.model.param_dtype=float32` casts a bfloat16 checkpoint up).
"""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from moejax.convert.hf import from_hf
from moejax.data.tokenizers import HUB_TOKENIZER_CONFIGS, HUB_TOKENIZER_FILES
from moejax.errors import InputError


def import_hf(source: str, workdir: str, config_file: str | None,
              overrides: list[tuple[str, str]]) -> dict:
  """Import `source` into `workdir`; what was imported (family, parameters, the checkpoint)."""
  from moejax.train import config as config_lib
  from moejax.train.run import open_run
  model, params = from_hf(source)
  config = (config_lib.config_from_file(config_file) if config_file
            else config_lib.default_config())
  config.model.update(model.to_dict())
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
  run.checkpoints.save(state, None, force=True)
  if jax.process_index() == 0:
    config_lib.write_saved_config(config, workdir)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {'source': source, 'workdir': workdir, 'parameters': count,
          'checkpoint': run.checkpoints.directory, 'step': 0}


def copy_tokenizer(source: str, directory: str) -> str | None:
  """Copy a hub directory's tokenizer files (tokenizer.json, spiece.model or tokenizer.model,
  and the configs naming its special tokens) into `directory`, which it returns; None, copying
  nothing, when `source` has no tokenizer."""
  if not any(os.path.exists(os.path.join(source, f)) for f in HUB_TOKENIZER_FILES):
    return None
  os.makedirs(directory, exist_ok=True)
  for name in (*HUB_TOKENIZER_FILES, *HUB_TOKENIZER_CONFIGS):
    if os.path.exists(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
  return directory


def _placed(imported: dict, fresh):
  """The imported arrays on the fresh params' devices and shardings, in their dtypes (the
  config's: no cast unless an override changed `param_dtype`); InputError naming the first
  parameter whose shape the config changed (an override of a model field)."""
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
