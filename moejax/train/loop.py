"""The training loop, evaluation and sampling of a run, read top to bottom (nanoGPT-style).

A run lives in its work directory: checkpoints/ (Orbax), metrics.jsonl, tensorboard/, config.json
(and spm.model when it trains a SentencePiece vocabulary). Running `train` again on the same
work directory resumes from the latest checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from moejax import data as data_lib
from moejax import sharding as moe_sharding
from moejax.models import make_model, per_token_flops
from moejax.train import sharding
from moejax.train.checkpoint import Checkpoints
from moejax.train.config import absolute_paths, check_config, model_config, saved_config
from moejax.train.lock import workdir_lock
from moejax.train.metrics import MetricsWriteError, MetricWriter, NullWriter
from moejax.train.optim import learning_rate_schedule, make_optimizer
from moejax.train.sampling import generate
from moejax.train.step import (dummy_batch, has_moe, init_state, make_eval_step,
                               make_train_step)
from moejax.upcycle import upcycle_optimizer_state, upcycle_tree


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row."""


@dataclasses.dataclass
class Run:
  """Everything a command needs: config, tokenizer, model, optimizer, mesh, checkpoints."""
  config: ml_collections.ConfigDict
  workdir: str
  tokenizer: object
  model_config: object
  model: object
  tx: object
  mesh: object
  checkpoints: Checkpoints

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

  def to_global(self, batch: dict) -> dict:
    """A global batch (every process builds the same) as the steps take it: on a mesh, global
    arrays assembled from each process's own rows."""
    if self.mesh is None:
      return batch
    rows = moe_sharding.process_rows(self.mesh, len(next(iter(batch.values()))))
    return moe_sharding.shard_batch({name: value[rows] for name, value in batch.items()},
                                    self.mesh)

  def fresh_state(self):
    """The initial state, placed on the mesh's shardings when there is a mesh."""
    batch = self.example_batch(self.init_batch_size)
    init = lambda: init_state(self.model, self.tx, batch, self.config.seed)
    return jax.jit(init, out_shardings=self.shardings(jax.eval_shape(init)))()

  def eval_step(self, params):
    return make_eval_step(self.model, self.mesh, self.shardings(params))

  @functools.cached_property
  def eval_batches(self) -> list:
    cfg = self.config
    return data_lib.eval_batches(cfg.data, self.tokenizer, cfg.task, cfg.eval.batch_size,
                                 cfg.eval.max_batches)

  @functools.cached_property
  def chars_per_token(self) -> float:
    return data_lib.chars_per_token(self.config.data, self.tokenizer, self.config.data.eval_split)


def open_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """The run of `config` in `workdir`: the config checked (ConfigError naming the field), the
  corpus checked against data.length, the tokenizer, model, optimizer, mesh and checkpoints."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = data_lib.tokenizer_for(config.data, workdir)
  data_lib.check_corpus(config.data, tokenizer)
  vocab_size = data_lib.model_vocab_size(tokenizer, config.data, config.task)
  model_cfg = model_config(config, vocab_size)
  mesh_shape = (config.mesh.data, config.mesh.expert, config.mesh.model)
  mesh = None
  if np.prod(mesh_shape) > 1:
    mesh = moe_sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'), config.checkpoint.every_steps,
                            config.checkpoint.keep)
  return Run(config, workdir, tokenizer, model_cfg, make_model(model_cfg),
             make_optimizer(config.train), mesh, checkpoints)


def stop_agreed(stop: list) -> str | None:
  """The signal that stops the run, agreed by every process: when any process was signalled
  (a preempted host), all stop at the same step. One small all-gather per call with several
  processes."""
  if jax.process_count() == 1:
    return stop[0]
  signalled = multihost_utils.process_allgather(np.int32(stop[0] is not None))
  if not signalled.any():
    return None
  return stop[0] or 'SIGTERM (on another process)'


@contextlib.contextmanager
def stop_requests():
  """While active, SIGTERM / SIGINT set `requested[0]` instead of killing the process, so the loop
  can finish its step and save; a second SIGINT interrupts at once."""
  requested = [None]

  def handler(signum, frame):
    if requested[0] is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    requested[0] = signal.Signals(signum).name

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield requested
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def evaluate(run: Run, params, eval_step=None, bias_state=None, stop=None) -> dict | None:
  """Validation metrics over the eval split (eval capacity factor); nats per token and per char.
  bias_state: the train state's `balancing_bias_state` (models with balancing biases).
  stop: `stop_requests()`'s flag; when it is raised between batches, returns None."""
  cfg = run.config
  eval_step = eval_step or run.eval_step(params)
  totals = {}
  for batch in run.eval_batches:
    if stop is not None and stop_agreed(stop):
      return None
    metrics = eval_step(params, run.to_global(batch), bias_state)
    for name, value in jax.device_get(metrics).items():
      totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
  tokens = max(float(totals.pop('tokens')), 1.0)
  metrics = {name: value / tokens for name, value in totals.items()}
  metrics['nll'] = metrics.pop('nll_sum')
  if cfg.task == 'lm':
    metrics['nats_per_char'] = metrics['nll'] / run.chars_per_token
  return metrics


def upcycled_state(run: Run):
  """(state, data position) of a run that starts by upcycling the dense run in
  `config.upcycle.from_workdir` at checkpoint `config.upcycle.step` (default: its latest).

  Params and Adam moments come from `moejax.upcycle`; the step, the optimizer's counts (so the
  learning-rate schedule goes on where the dense run was) and the data position are the dense
  run's, so both runs see the same batches from there (given the same data config, batch size
  and seed: the shuffle is seeded).
  """
  up = run.config.upcycle
  dense_run = open_run(saved_config(up.from_workdir), up.from_workdir)
  dense, position = dense_run.checkpoints.restore(dense_run.fresh_state(),
                                                  dense_run.model_config, up.step)
  dense_run.checkpoints.close()
  fresh = run.fresh_state()
  noise_rng = jax.random.fold_in(jax.random.key(run.config.seed), 1)
  state = fresh.replace(step=dense.step,
                        params=upcycle_tree(dense.params, fresh.params, up.noise_std, noise_rng),
                        opt_state=upcycle_optimizer_state(dense.opt_state, fresh.opt_state,
                                                          fresh.params))
  shardings = run.shardings(state)
  return (state if shardings is None else jax.device_put(state, shardings)), position


def restore_or_init(run: Run, step: int | None = None):
  """(state, data position): checkpoint `step`'s (later steps are moved aside), or the newest
  complete checkpoint's (damaged newer steps are moved aside with a warning; CheckpointError when
  none is usable); else, when `config.upcycle.from_workdir` is set, the upcycled dense
  checkpoint's; else a fresh state at position 0."""
  if run.checkpoints.step_dirs() or step is not None:
    return run.checkpoints.restore(run.fresh_state(), run.model_config, step, quarantine=True)
  if run.config.get('upcycle') and run.config.upcycle.from_workdir:
    return upcycled_state(run)
  return run.fresh_state(), 0


def train(config: ml_collections.ConfigDict, workdir: str, quiet: bool = False,
          step: int | None = None) -> dict:
  """Train (or resume) to config.train.num_steps; returns a summary of the run.

  Holds the work directory's lock (WorkdirLocked if another run holds it). Stops early, after
  saving, on SIGTERM/SIGINT, also during the final evaluation (summary['stopped_by'] names the
  signal); raises TrainingDiverged after `max_nonfinite_in_a_row` skipped updates in a row, and
  MetricsWriteError (after saving a checkpoint if it can) when the metrics cannot be written.
  `step`: resume from that checkpoint instead of the newest (the later ones are set aside).
  """
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train(config, workdir, quiet, step)


def _train(config: ml_collections.ConfigDict, workdir: str, quiet: bool,
           resume_step: int | None) -> dict:
  cfg, tcfg = config, config.train
  run = open_run(config, workdir)
  lead = jax.process_index() == 0  # writes config.json, metrics and the progress bar
  if lead:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(absolute_paths(config.copy_and_resolve_references()).to_json(indent=2))
  state, position = restore_or_init(run, resume_step)
  start = int(jax.device_get(state.step))
  train_step = make_train_step(run.model, run.tx, tcfg.load_balancing_loss_coef,
                               tcfg.router_z_loss_coef, run.mesh, run.shardings(state))
  eval_step = run.eval_step(state.params)
  batches = data_lib.train_batches(cfg.data, run.tokenizer, cfg.task, tcfg.batch_size, cfg.seed,
                                   start=position)
  writer = MetricWriter(workdir) if lead else NullWriter()
  schedule = learning_rate_schedule(tcfg)
  tokens_per_step = tcfg.batch_size * cfg.data.length
  step_seconds, train_dropped, stopped_by, eval_metrics = [], [], None, {}
  progress = tqdm(range(start, tcfg.num_steps), initial=start, total=tcfg.num_steps,
                  desc='train', disable=quiet or not lead, dynamic_ncols=True)
  try:
    with stop_requests() as stop:
      for step in progress:
        batch = next(batches)
        tic = time.perf_counter()
        state, metrics = train_step(state, run.to_global(batch))
        metrics = jax.device_get(metrics)
        step_seconds.append(time.perf_counter() - tic)
        metrics['tokens_per_sec'] = tokens_per_step / step_seconds[-1]
        # The rate of this step's update: skipped (non-finite) steps do not advance the optimizer.
        applied = step - int(metrics['nonfinite_total']) + int(metrics['skipped'])
        metrics['learning_rate'] = float(schedule(applied))
        train_dropped.append(float(metrics.get('fraction_dropped', 0.0)))
        if (step + 1) % tcfg.log_every == 0 or metrics['skipped']:
          writer.write(step + 1, 'train', metrics)
        progress.set_postfix(loss=f'{metrics["loss"]:.3f}', skipped=int(metrics['nonfinite_total']))
        in_a_row = int(jax.device_get(state.nonfinite_in_a_row))
        if in_a_row >= tcfg.max_nonfinite_in_a_row:
          raise TrainingDiverged(
              f'loss or gradient non-finite {in_a_row} steps in a row, up to step {step + 1}; '
              f'stopping. The last good checkpoint (step {run.checkpoints.latest_step()}) is in '
              f'{run.checkpoints.directory}.')
        if (step + 1) % cfg.eval.every_steps == 0 and step + 1 < tcfg.num_steps:
          eval_metrics = evaluate(run, state.params, eval_step, state.balancing_bias_state)
          writer.write(step + 1, 'eval', eval_metrics)
          if lead:
            progress.write(f'step {step + 1}: validation loss {eval_metrics["nll"]:.4f} '
                           'nats/token')
        if in_a_row == 0:  # never save during a non-finite streak: it may be heading to divergence
          run.checkpoints.save(state, step + 1, run.model_config)
        stopped_by = stop_agreed(stop)
        if stopped_by:
          break
      end = int(jax.device_get(state.step))
      if int(jax.device_get(state.nonfinite_in_a_row)) == 0:
        run.checkpoints.save(state, end, run.model_config, force=True)  # sealed when it returns
      if stopped_by is None and end == tcfg.num_steps:  # a signal here stops the evaluation only
        eval_metrics = evaluate(run, state.params, eval_step, state.balancing_bias_state, stop)
        if eval_metrics is None:
          stopped_by = stop_agreed(stop)
        else:
          writer.write(end, 'eval', eval_metrics)
  except MetricsWriteError as error:
    raise MetricsWriteError(error.errno, f'{error.strerror}; {_save_after_failure(run, state)}'
                            ) from error
  finally:
    writer.close()
  timed = step_seconds[1:] or step_seconds  # the first step compiles
  return {'step': end, 'stopped_by': stopped_by, 'eval': eval_metrics,
          'tokens_per_sec': tokens_per_step / float(np.median(timed)) if timed else None,
          'nonfinite_total': int(jax.device_get(state.nonfinite_total)),
          'per_token_flops': per_token_flops(run.model_config, cfg.data.length),
          'train_fraction_dropped': float(np.mean(train_dropped[-50:])) if train_dropped else None,
          'has_moe': has_moe(run.model_config), 'state': state, 'run': run}


def _save_after_failure(run: Run, state) -> str:
  """Save `state` if it is not mid non-finite streak; says what was saved."""
  step = int(jax.device_get(state.step))
  try:
    if int(jax.device_get(state.nonfinite_in_a_row)) == 0:
      run.checkpoints.save(state, step, run.model_config, force=True)
  except Exception as error:  # the disk that failed the metrics may fail this too
    return (f'the run stopped at step {step}; saving a checkpoint failed too ({error}); the '
            f'last complete checkpoint is step {run.checkpoints.latest_step()}')
  return (f'the run stopped at step {step}; the last complete checkpoint is step '
          f'{run.checkpoints.latest_step()} in {run.checkpoints.directory}')


def load(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(run, state) from the latest (or a given) checkpoint of `workdir`."""
  run = open_run(config, workdir)
  if not run.checkpoints.step_dirs():
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first.')
  state, _ = run.checkpoints.restore(run.fresh_state(), run.model_config, step)
  return run, state


SENTINEL = '<X>'


def encode_prompt(run: Run, prompt: str) -> np.ndarray:
  """Token ids of a prompt; for span corruption, each '<X>' becomes the next sentinel id."""
  if run.config.task != 'span_corruption':
    return run.tokenizer.encode(prompt)
  ids = []
  for i, piece in enumerate(prompt.split(SENTINEL)):
    if i:
      ids.append(run.model_config.vocab_size - i)  # sentinel i - 1
    ids.extend(run.tokenizer.encode(piece))
  return np.asarray(ids, np.int32)


def sample_text(run: Run, params, prompt: str, num_tokens: int, temperature: float,
                seed: int, bias_state=None) -> str:
  """Continue `prompt` (decoder), or fill its '<X>' spans (encoder-decoder; the generated
  sentinels are dropped from the text). bias_state: as in `evaluate`."""
  ids = generate(run.model, params, encode_prompt(run, prompt), num_tokens,
                 run.config.data.length, temperature, seed, bias_state)
  return run.tokenizer.decode(ids)


def format_summary(summary: dict) -> str:
  """The end-of-run report: validation loss, speed, expert usage, fraction dropped."""
  ev = summary['eval']
  lines = [f'step {summary["step"]}' + (f' (stopped by {summary["stopped_by"]})'
                                        if summary['stopped_by'] else '')]
  if ev:
    loss = f'validation loss {ev["nll"]:.4f} nats/token'
    if 'nats_per_char' in ev:
      loss += f', {ev["nats_per_char"]:.4f} nats/char'
    lines.append(loss)
  if summary['tokens_per_sec']:
    lines.append(f'train speed {summary["tokens_per_sec"]:,.0f} tokens/s '
                 f'({summary["per_token_flops"] / 1e6:.2f} MFLOP/token forward)')
  lines.append(f'non-finite steps skipped: {summary["nonfinite_total"]}')
  if ev and summary['has_moe']:
    cfg = summary['run'].model_config
    dropped = f'eval (capacity factor {cfg.eval_capacity_factor}) {ev["fraction_dropped"]:.4f}'
    if summary['train_fraction_dropped'] is not None:
      dropped = (f'train (capacity factor {cfg.train_capacity_factor}, last 50 steps) '
                 f'{summary["train_fraction_dropped"]:.4f}, ' + dropped)
    lines.append(f'fraction of token choices dropped: {dropped}')
    lines.append(f'eval load-balancing loss {ev["load_balancing_loss"]:.3f} (1 = uniform), '
                 f'router z-loss {ev["router_z_loss"]:.3f}; expert usage per layer:')
    for name, usage in ev.items():
      if name.startswith('expert_usage/'):
        lines.append(f'  usage {name[len("expert_usage/"):]:<24} '
                     + ' '.join(f'{u:.2f}' for u in np.ravel(usage)))
  return '\n'.join(lines)
