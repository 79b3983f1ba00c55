"""A run: what every command on a work directory needs, built from its config (tokenizer, model,
optimizer, mesh, checkpoints), and how its state and batches are placed on the mesh.

A run lives in its work directory: checkpoints/ (Orbax), metrics.jsonl, tensorboard/, config.json,
tokens/ (each split tokenized once, `moejax.data.tokens`), and spm.model when it trains a
SentencePiece vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import ml_collections
import numpy as np

from moejax import data as data_lib
from moejax import sharding as moe_sharding
from moejax.models import make_model
from moejax.train import sharding
from moejax.train.checkpoint import Checkpoints
from moejax.train.config import check_config, model_config
from moejax.train.inputs import dummy_batch
from moejax.train.optim import make_optimizer
from moejax.train.step import init_state, make_eval_step

# The train fields that change the train state's arrays (the optimizer's state tree), saved in
# each checkpoint beside every model field, so a resume that does not fit names what changed.
STATE_TRAIN_FIELDS = ('optimizer', 'weight_decay')


@dataclasses.dataclass
class Run:
  """Everything a command needs: config, tokenizer, model, optimizer, mesh, checkpoints."""
  config: ml_collections.ConfigDict
  workdir: str | None
  tokenizer: object
  model_config: object
  model: object
  tx: object
  mesh: object
  checkpoints: Checkpoints | None
  _tokens: dict = dataclasses.field(default_factory=dict, repr=False)  # split -> SplitTokens

  def example_batch(self, batch_size):
    length = self.config.data.length
    if self.config.task == 'span_corruption':
      inputs_len, targets_len = data_lib.span_corruption_lengths(
          length, self.config.data.noise_density, self.config.data.mean_span_length)
      return dummy_batch(self.model_config, batch_size, targets_len, inputs_len)
    return dummy_batch(self.model_config, batch_size, length)

  @property
  def init_batch_size(self) -> int:
    """The fewest rows whose tokens `model.group_size` divides (1 without groups): what params
    are initialized (and their specs traced) on."""
    group_size, length = self.model_config.group_size, self.config.data.length
    return 1 if group_size is None else group_size // math.gcd(group_size, length)

  def shardings(self, state):
    """NamedShardings of a state (or params) tree on the run's mesh; None without a mesh."""
    if self.mesh is None:
      return None
    specs = sharding.param_specs(self.model, self.example_batch(self.init_batch_size))
    return sharding.state_shardings(state, specs, self.mesh)

  def rows(self, batch_size: int) -> slice:
    """The rows of a global batch this process feeds: those its devices hold (all without a
    mesh)."""
    if self.mesh is None:
      return slice(0, batch_size)
    return moe_sharding.process_rows(self.mesh, batch_size)

  def to_global(self, rows: dict) -> dict:
    """This process's rows of a batch as the steps take it: on a mesh, global arrays assembled
    from every process's rows."""
    return rows if self.mesh is None else moe_sharding.shard_batch(rows, self.mesh)

  def tokens(self, split: str):
    """The split's tokens (`moejax.data.SplitTokens`), written once into <workdir>/tokens/."""
    if split not in self._tokens:
      self._tokens[split] = data_lib.split_tokens(self.config.data, split, self.tokenizer,
                                                  os.path.join(self.workdir, 'tokens'))
    return self._tokens[split]

  def train_batches(self, data_state: dict | None):
    """This process's rows of each training batch, from a checkpoint's `data_state`."""
    cfg = self.config
    return data_lib.train_batches(self.tokens(cfg.data.train_split).tokens, cfg.data, cfg.task,
                                  self.tokenizer, cfg.train.batch_size, cfg.seed,
                                  self.rows(cfg.train.batch_size), data_state)

  def _init(self):
    batch = self.example_batch(self.init_batch_size)
    return lambda: init_state(self.model, self.tx, batch, self.config.seed)

  def fresh_state(self):
    """The initial state, placed on the mesh's shardings when there is a mesh."""
    init = self._init()
    return jax.jit(init, out_shardings=self.shardings(jax.eval_shape(init)))()

  def abstract_state(self):
    """The initial state's shapes, dtypes and shardings (`jax.ShapeDtypeStruct`s): what a
    checkpoint restores into, nothing allocated."""
    shapes = jax.eval_shape(self._init())
    shardings = self.shardings(shapes)
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree.map(lambda _: device, shapes)
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                 sharding=sharding),
                        shapes, shardings)

  def eval_step(self, params):
    return make_eval_step(self.model, self.mesh, self.shardings(params))

  @functools.cached_property
  def eval_batches(self) -> list:
    """This process's rows of each evaluation batch (the whole split, in order)."""
    cfg = self.config
    batches = data_lib.eval_batches(self.tokens(cfg.data.eval_split).tokens, cfg.data, cfg.task,
                                    self.tokenizer, cfg.eval.batch_size,
                                    cfg.eval.max_batches)
    rows = self.rows(cfg.eval.batch_size)
    return [{name: value[rows] for name, value in batch.items()} for batch in batches]

  @functools.cached_property
  def chars_per_token(self) -> float:
    return data_lib.chars_per_token(self.tokens(self.config.data.eval_split))


def state_fields(config: ml_collections.ConfigDict, model) -> dict:
  """{'model.<field>': value, 'train.optimizer': ..., ...}: the settings that shape the state."""
  fields = {f'model.{k}': v for k, v in model.to_dict().items()}
  fields.update({f'train.{k}': config.train[k] for k in STATE_TRAIN_FIELDS})
  return fields


def plan_run(config: ml_collections.ConfigDict, workdir: str | None = None) -> Run:
  """The run of a checked `config`: its tokenizer (a SentencePiece vocabulary trained once into
  `workdir`), model, optimizer and mesh; no checkpoints (None), no corpus read. What lowering
  its steps needs (`moejax.train.lowering`)."""
  tokenizer = data_lib.tokenizer_for(config.data, workdir)
  vocab_size = data_lib.model_vocab_size(tokenizer, config.data, config.task)
  model_cfg = model_config(config, vocab_size, tokenizer.start_id(config.model.kind))
  mesh_shape = (config.mesh.data, config.mesh.expert, config.mesh.model)
  mesh = None
  if np.prod(mesh_shape) > 1:
    mesh = moe_sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  return Run(config, workdir, tokenizer, model_cfg, make_model(model_cfg),
             make_optimizer(config.train, model_cfg.param_dtype), mesh, checkpoints=None)


def open_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """The run of `config` in `workdir`: the config checked (ConfigError naming the field), the
  corpus checked against data.length, the tokenizer, model, optimizer, mesh and checkpoints."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  run = plan_run(config, workdir)
  run.checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'),
                                config.checkpoint.every_steps, config.checkpoint.keep,
                                state_fields(config, run.model_config))
  if data_lib.is_local(config.data.source):  # a short local corpus is refused before training
    data_lib.check_corpus(config.data, {split: run.tokens(split) for split in
                                        (config.data.train_split, config.data.eval_split)})
  return run
