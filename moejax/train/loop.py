"""The training loop of a run, read top to bottom (nanoGPT-style).

Running `train` again on the same work directory resumes from the newest complete checkpoint
(`moejax.train.resume`); the run's files change only once the restored state is known to fit the
config. A stop (SIGTERM / SIGINT on any process, a failed metrics write) is agreed by every
process between steps and between evaluation batches (`moejax.train.stopping`); the state is then
saved and the loop ends.
"""
from __future__ import annotations

import errno
import os
import time

import jax
import ml_collections
from tqdm import tqdm

from moejax.train.config import write_saved_config
from moejax.train.evaluation import evaluate
from moejax.train.lock import workdir_lock
from moejax.train.metrics import MetricsWriteError, MetricWriter, NullWriter
from moejax.train.optim import learning_rate_schedule
from moejax.train.resume import restart as restart_run
from moejax.train.resume import restore_or_init, save_after_failure
from moejax.train.run import open_run
from moejax.train.step import make_train_step
from moejax.train.stopping import StopRequest, agreed_stop, stop_requests
from moejax.train.summary import summarize


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row."""


def train(config: ml_collections.ConfigDict, workdir: str, quiet: bool = False,
          step: int | None = None, restart: bool = False) -> dict:
  """Train (or resume) to config.train.num_steps; returns a summary of the run.

  Holds the work directory's lock (WorkdirLocked if another run holds it). Stops early, after
  saving, on SIGTERM/SIGINT, also during an evaluation (summary['stopped_by'] names the signal);
  raises TrainingDiverged after `max_nonfinite_in_a_row` skipped updates in a row, and
  MetricsWriteError (after saving a checkpoint if it can) when the metrics cannot be written.
  `step`: resume from that checkpoint instead of the newest (the later ones are set aside).
  `restart`: start afresh, the old run's files moved into previous_runs/ first.
  """
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock(workdir):
    if restart:
      restart_run(workdir)
    return _train(config, workdir, quiet, step)


class _Writer:
  """The run's metric writer (process 0's; a NullWriter elsewhere) whose failures are recorded
  in the stop request instead of raised, so every process saves and stops together."""

  def __init__(self, workdir: str, request: StopRequest):
    self.request, self.writer = request, NullWriter()
    if jax.process_index() == 0:
      try:
        self.writer = MetricWriter(workdir)
      except MetricsWriteError as error:
        request.failure = error

  def write(self, step: int, split: str, metrics: dict):
    if self.request.failure is None:
      try:
        self.writer.write(step, split, metrics)
      except MetricsWriteError as error:
        self.request.failure = error

  def close(self):
    self.writer.close()


def _train(config: ml_collections.ConfigDict, workdir: str, quiet: bool,
           resume_step: int | None) -> dict:
  cfg, tcfg = config, config.train
  run = open_run(config, workdir)
  lead = jax.process_index() == 0  # writes config.json, metrics and the progress bar
  state, data_state = restore_or_init(run, resume_step)  # may refuse: nothing written before it
  if lead:
    write_saved_config(config, workdir)
  start = int(jax.device_get(state.step))
  train_step = make_train_step(run.model, run.tx, tcfg.load_balancing_loss_coef,
                               tcfg.router_z_loss_coef, run.mesh, run.shardings(state))
  eval_step = run.eval_step(state.params)
  batches = run.train_batches(data_state)  # this process's rows of each batch
  schedule = learning_rate_schedule(tcfg)
  tokens_per_step = tcfg.batch_size * cfg.data.length
  step_seconds, train_dropped, eval_metrics = [], [], {}
  progress = tqdm(range(start, tcfg.num_steps), initial=start, total=tcfg.num_steps,
                  desc='train', disable=quiet or not lead, dynamic_ncols=True)
  with stop_requests() as request:
    writer = _Writer(workdir, request)
    stop = agreed_stop(request)
    try:
      for step in progress if not stop else ():
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
          evaluated = evaluate(run, state.params, eval_step, state.balancing_bias_state, request)
          if evaluated is None:  # stopped during the evaluation: save and end below
            stop = agreed_stop(request)
            break
          eval_metrics = evaluated
          writer.write(step + 1, 'eval', eval_metrics)
          if lead:
            progress.write(f'step {step + 1}: validation loss {eval_metrics["nll"]:.4f} '
                           'nats/token')
        if in_a_row == 0:  # never save during a non-finite streak: it may be heading to divergence
          run.checkpoints.save(state, batches.get_state())
        stop = agreed_stop(request)
        if stop:
          break
      end = int(jax.device_get(state.step))
      if not stop.failed and int(jax.device_get(state.nonfinite_in_a_row)) == 0:
        run.checkpoints.save(state, batches.get_state(), force=True)  # sealed when it returns
      if not stop and end == tcfg.num_steps:  # a signal here stops the evaluation only
        evaluated = evaluate(run, state.params, eval_step, state.balancing_bias_state, request)
        if evaluated is None:
          stop = agreed_stop(request)
        else:
          eval_metrics = evaluated
          writer.write(end, 'eval', eval_metrics)
          stop = agreed_stop(request)
    finally:
      writer.close()
  if stop.failed:
    _raise_write_failure(request, save_after_failure(run, state, batches.get_state()))
  return summarize(run, state, stop.signal, eval_metrics, step_seconds, train_dropped)


def _raise_write_failure(request: StopRequest, saved: str):
  """MetricsWriteError on every process: the local failure, or process 0's, with what was saved."""
  error = request.failure
  if error is None:
    raise MetricsWriteError(errno.EIO, f'writing the metrics failed on another process; {saved}')
  raise MetricsWriteError(error.errno, f'{error.strerror}; {saved}') from error
