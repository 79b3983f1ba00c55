"""The training loop under faults: a failing final evaluation, SIGTERM during it, a non-finite
streak, a second run on the same work directory, a full disk."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, SMOKE_CONFIG, smoke_config
from moejax.train import loop
from moejax.train.checkpoint import Checkpoints
from moejax.train.lock import LOCK_FILE, StaleLockWarning, WorkdirLocked, workdir_lock
from moejax.train.metrics import MetricsWriteError

ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def _steps(workdir):
  checkpoints = Checkpoints(str(workdir / 'checkpoints'), 2, 3)
  return [s for s in checkpoints.step_dirs() if checkpoints.problem(s) is None]


def _final_evaluation(monkeypatch, action):
  """Make `action()` happen when the final evaluation (the one given the stop flag) starts."""
  evaluate = loop.evaluate

  def patched(run, params, eval_step=None, bias_state=None, stop=None):
    if stop is not None:
      action()
    return evaluate(run, params, eval_step, bias_state, stop)
  monkeypatch.setattr(loop, 'evaluate', patched)


@pytest.mark.slow
def test_an_exception_in_the_final_evaluation_leaves_the_last_checkpoint_committed(
    tmp_path, monkeypatch, tfds_dir):
  def fail():
    raise RuntimeError('evaluation failed')
  _final_evaluation(monkeypatch, fail)
  with pytest.raises(RuntimeError, match='evaluation failed'):
    loop.train(smoke_config(tfds_dir), str(tmp_path / 'run'), quiet=True)
  assert _steps(tmp_path / 'run') == [2, 4, 5]
  assert not (tmp_path / 'run' / LOCK_FILE).read_text()  # released


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_it_after_saving(tmp_path, monkeypatch, tfds_dir):
  _final_evaluation(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM))
  summary = loop.train(smoke_config(tfds_dir), str(tmp_path / 'run'), quiet=True)
  assert summary['stopped_by'] == 'SIGTERM' and summary['step'] == 5
  assert _steps(tmp_path / 'run') == [2, 4, 5]
  monkeypatch.undo()  # the rerun only evaluates
  summary = loop.train(smoke_config(tfds_dir), str(tmp_path / 'run'), quiet=True)
  assert summary['stopped_by'] is None and summary['eval']['nll'] > 0


@pytest.mark.slow
def test_no_checkpoint_is_written_during_a_non_finite_streak(tmp_path, monkeypatch, tfds_dir):
  make_train_step = loop.make_train_step

  def streaky(*args, **kwargs):
    """Steps 3 and 4 report non-finite (the state keeps its parameters, as the real step does)."""
    step_fn = make_train_step(*args, **kwargs)

    def wrapped(state, batch):
      new, metrics = step_fn(state, batch)
      if int(new.step) in (3, 4):
        new = new.replace(nonfinite_in_a_row=new.nonfinite_in_a_row + int(new.step) - 2)
      return new, metrics
    return wrapped
  monkeypatch.setattr(loop, 'make_train_step', streaky)
  loop.train(smoke_config(tfds_dir), str(tmp_path / 'run'), quiet=True)
  steps = _steps(tmp_path / 'run')
  assert 4 not in steps and steps[-1] == 5  # 4 fell mid-streak (a normal run saves 2, 4, 5)


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path, tfds_dir):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with workdir_lock(str(workdir)):
    with pytest.raises(WorkdirLocked, match=rf'in use by another `moejax train` \(pid '
                                            rf'{os.getpid()} on host'):
      loop.train(smoke_config(tfds_dir), str(workdir), quiet=True)
    result = subprocess.run([sys.executable, '-m', 'moejax.cli', 'train', '--config',
                             SMOKE_CONFIG, '--workdir', str(workdir)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f'pid {os.getpid()}' in result.stderr and len(result.stderr.splitlines()) == 1
  assert not (workdir / 'config.json').exists()  # the refused runs wrote nothing


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, tfds_dir):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / LOCK_FILE).write_text(json.dumps({'pid': 999999, 'host': 'gone',
                                               'since': '2026-01-01 00:00:00'}))
  with pytest.warns(StaleLockWarning, match='from pid 999999 on host gone'):
    summary = loop.train(smoke_config(tfds_dir), str(workdir), quiet=True)
  assert summary['step'] == 5


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_a_clear_error_and_no_hang(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  os.symlink('/dev/full', workdir / 'metrics.jsonl')  # every write: ENOSPC
  start = time.perf_counter()
  result = subprocess.run([sys.executable, '-m', 'moejax.cli', 'train', '--config', SMOKE_CONFIG,
                           '--workdir', str(workdir), f'--config.data.data_dir={tmp_path}/tfds'],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
  assert result.returncode == 1, result.stderr
  (line,) = [l for l in result.stderr.splitlines() if l.startswith('moejax train:')]
  assert 'No space left on device' in line and 'metrics.jsonl' in line
  assert 'the run stopped at step 1; the last complete checkpoint is step 1' in line
  assert time.perf_counter() - start < 200


def test_a_failing_tensorboard_file_raises_at_once(tmp_path, monkeypatch, tfds_dir):
  from tensorboardX.event_file_writer import EventsWriter

  def full(self, event):
    raise OSError(28, 'No space left on device')
  config = smoke_config(tfds_dir)
  monkeypatch.setattr(EventsWriter, 'write_event', full)
  with pytest.raises(MetricsWriteError, match='cannot write metrics to .*tensorboard: No space'):
    loop.train(config, str(tmp_path / 'run'), quiet=True)


def _signal_on_eval_batch(monkeypatch, batch: int):
  """SIGTERM this process when an evaluation reaches its `batch`-th batch (1-based)."""
  from moejax.train.run import Run
  real = Run.eval_step
  seen = [0]

  def eval_step(self, params):
    step = real(self, params)

    def counted(*args):
      seen[0] += 1
      if seen[0] == batch:
        os.kill(os.getpid(), signal.SIGTERM)
      return step(*args)
    return counted
  monkeypatch.setattr(Run, 'eval_step', eval_step)
  return seen


def test_sigterm_during_a_mid_run_evaluation_stops_between_batches_and_saves(
    tfds_dir, tmp_path, monkeypatch):
  seen = _signal_on_eval_batch(monkeypatch, batch=2)
  config = smoke_config(tfds_dir, num_steps=8)
  config.eval.every_steps = 3
  summary = loop.train(config, str(tmp_path / 'run'), quiet=True)
  assert summary['stopped_by'] == 'SIGTERM' and summary['step'] == 3
  assert seen[0] == 2  # the evaluation stopped after its second batch (of 4)
  assert _steps(tmp_path / 'run')[-1] == 3  # saved where it stopped
  rows = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert not [r for r in rows if r['split'] == 'eval']  # no half-evaluation was written


def test_sigterm_stops_eval_and_analyze_on_their_own(smoke_run, tmp_path, monkeypatch, capsys):
  from moejax import cli
  _signal_on_eval_batch(monkeypatch, batch=1)
  capsys.readouterr()
  assert cli.main(['moejax', 'eval', '--workdir', str(smoke_run[0])]) == 143
  out, err = capsys.readouterr()
  assert '"nll"' not in out
  assert err.strip() == 'moejax eval: stopped by SIGTERM before it finished; nothing was written'

  from moejax.analysis import report
  real = report.route_tokens

  def route_then_signal(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
  monkeypatch.setattr(report, 'route_tokens', route_then_signal)
  out_dir = tmp_path / 'analysis'
  assert cli.main(['moejax', 'analyze', '--workdir', str(smoke_run[0]), '--out', str(out_dir),
                   '--max_tokens', '64']) == 143
  assert 'stopped by SIGTERM' in capsys.readouterr().err and not out_dir.exists()
