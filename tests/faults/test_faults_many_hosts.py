"""The command line as 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) trains,
resumes and evaluates exactly as 1 process x 8 devices; a SIGTERM to one process stops both at
the same step (also inside an evaluation); a locked work directory and a failed metrics write
stop both alike.

Each 2-process launch costs about 25 CPU seconds (imports, and compiling: the persistent cache
serves process 0 only, its keys differ between processes), so one launch serves several checks:
the SIGTERM run is the first half of the run that is resumed and compared with 1 process."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from helpers import REPO, SMOKE_CONFIG, run_cli, smoke_config, train_args
from moejax.data import documents
from moejax.train.checkpoint import Checkpoints
from moejax.train.lock import workdir_lock
from xla_flags import xla_flags

# Every run's: the 2 x 4 mesh, and 1 sampled token, not 40, after a finished run (no check reads
# the sample; 40 overflow the 32-token window: one more program to compile on each process).
TRAIN = ['--config.mesh.data=2', '--config.mesh.expert=4', '--config.sample.num_tokens=1']
SHAKESPEARE = os.path.join(REPO, 'data', 'tinyshakespeare.txt')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(command, workdir, data_dir, *args, processes=1):
  """Start `moejax <command>` as one process of 8 devices or `processes` of 8 / processes."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_flags(8 // processes)}
  base = [sys.executable, '-m', 'moejax.cli', command, '--workdir', str(workdir)]
  if command == 'train':
    base += ['--config', SMOKE_CONFIG, f'--config.data.data_dir={data_dir}', *TRAIN]
  port = str(_free_port())
  many = (lambda i: ['--coordinator', f'127.0.0.1:{port}', '--num_processes', str(processes),
                     '--process_id', str(i)]) if processes > 1 else (lambda i: [])
  return [subprocess.Popen(base + list(args) + many(i), cwd=REPO, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
          for i in range(processes)]


def _results(processes, timeout=400):
  """[(exit status, stdout, stderr)] of each process."""
  results = []
  for process in processes:
    try:
      out, err = process.communicate(timeout=timeout)
    finally:
      process.kill()
    results.append((process.returncode, out, err))
  return results


def _wait(processes, timeout=400):
  """The stdout of each process, all of which must exit 0."""
  results = _results(processes, timeout)
  for status, _, err in results:
    assert status == 0, err[-3000:]
  return [out for _, out, _ in results]


def _metrics(workdir):
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  train = {r['step']: r['loss'] for r in rows if r['split'] == 'train'}
  evals = {r['step']: r['nll'] for r in rows if r['split'] == 'eval'}
  return train, evals


@pytest.fixture
def data_dir(tmp_path):
  """The local dataset prepared once, before several processes read it."""
  config = smoke_config(tmp_path / 'tfds')
  documents(config.data, 'train')
  return tmp_path / 'tfds'


def _train_here(capsys, workdir, data_dir, *args):
  """`moejax train` (the smoke config on the 2 x 4 mesh) as 1 process x 8 devices: this one."""
  status, _, err = run_cli(capsys, *train_args(workdir, data_dir, *TRAIN, *args), cwd=REPO)
  assert status == 0, err[-3000:]


def _sigterm_second(processes, workdir, ready, timeout=300) -> threading.Thread:
  """SIGTERM the second process only (a preempted "host") once the text of `workdir`'s
  metrics.jsonl satisfies `ready` (or after `timeout` seconds), polling every 50 ms in a thread,
  so that this process can train meanwhile. Join the thread returned."""
  def watch():
    metrics, deadline = workdir / 'metrics.jsonl', time.time() + timeout
    while time.time() < deadline and processes[1].poll() is None:
      if metrics.exists() and ready(metrics.read_text()):
        break
      time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  return watcher


def _stopped_line(out: str) -> str:
  (stopped,) = [line for line in out.splitlines() if line.startswith('stopped by')]
  return stopped


@pytest.mark.slow
def test_two_processes_stopped_by_sigterm_resume_and_evaluate_like_one(tmp_path, data_dir, capsys):
  """2 processes train until a SIGTERM to the second one, sent once 3 steps are logged, stops
  both at the same step k: process 0 says so, and the checkpoint saved at k (no periodic one
  before) is the newest and complete. Resumed to last = max(k, 5) + 2 steps, evaluating at
  last - 1 (mid-run) and last, every logged train loss (steps 1..last) and evaluation
  equals 1 process x 8 devices' (trained here, 5 steps then resumed to `last`, meanwhile) to 1e-5;
  so does `moejax eval` on 2 processes, whose report only process 0 prints."""
  one, two = tmp_path / 'one', tmp_path / 'two'
  processes = _launch('train', two, data_dir, '--config.train.num_steps=100000',
                      '--config.checkpoint.every_steps=50000', processes=2)
  watcher = _sigterm_second(processes, two, lambda text: len(text.splitlines()) >= 3)
  _train_here(capsys, one, data_dir)  # the reference's first 5 steps, while the 2 processes run
  outputs = _wait(processes)
  watcher.join()
  stopped = _stopped_line(outputs[0])
  stopped_at = int(stopped.split('checkpoint saved at step ')[1].split('.')[0])
  assert 'SIGTERM (on another process)' in stopped and 3 <= stopped_at < 100000
  checkpoints = Checkpoints(str(two / 'checkpoints'), 50000, 3)
  assert checkpoints.latest_step() == stopped_at and checkpoints.problem(stopped_at) is None

  last = max(stopped_at, 5) + 2
  resumed = [f'--config.train.num_steps={last}', f'--config.eval.every_steps={last - 1}']
  processes = _launch('train', two, data_dir, *resumed, processes=2)
  _train_here(capsys, one, data_dir, *resumed)
  _wait(processes)
  (train_one, eval_one), (train_two, eval_two) = _metrics(one), _metrics(two)
  assert sorted(train_two) == list(range(1, last + 1)) and sorted(eval_two) == [last - 1, last]
  assert sorted(train_one) == list(range(1, last + 1)) and sorted(eval_one) == [5, last - 1, last]
  for step in train_two:
    np.testing.assert_allclose(train_two[step], train_one[step], rtol=1e-5, err_msg=str(step))
  for step in eval_two:
    np.testing.assert_allclose(eval_two[step], eval_one[step], rtol=1e-5, err_msg=str(step))
  outputs = _wait(_launch('eval', two, data_dir, processes=2))
  assert '"nll"' not in outputs[1]  # one report per job, from process 0 (gloo logs aside)
  report = outputs[0][outputs[0].index('{'):outputs[0].rindex('}') + 1]
  np.testing.assert_allclose(json.loads(report)['nll'], eval_one[last], rtol=1e-5)


def _moejax_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith('moejax train:')]


@pytest.mark.slow
def test_a_locked_workdir_refuses_every_process_with_the_same_line(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with workdir_lock(str(workdir)):
    results = _results(_launch('train', workdir, data_dir, processes=2))
  lines = [_moejax_lines(err) for _, _, err in results]
  assert [rc for rc, _, _ in results] == [1, 1], [err[-2000:] for _, _, err in results]
  assert lines[0] == lines[1] and len(lines[0]) == 1 and f'pid {os.getpid()}' in lines[0][0]
  assert not (workdir / 'config.json').exists()


@pytest.mark.slow
def test_a_metrics_write_failure_on_process_0_saves_and_stops_both(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  os.symlink('/dev/full', workdir / 'metrics.jsonl')  # every write: ENOSPC, on process 0 only
  results = _results(_launch('train', workdir, data_dir, processes=2))
  assert [rc for rc, _, _ in results] == [1, 1], [err[-2000:] for _, _, err in results]
  (first,), (second,) = (_moejax_lines(err) for _, _, err in results)
  assert 'No space left on device' in first and 'metrics.jsonl' in first
  assert 'failed on another process' in second
  for line in (first, second):
    assert 'the run stopped at step 1; the last complete checkpoint is step 1' in line
  checkpoints = Checkpoints(str(workdir / 'checkpoints'), 2, 3)
  assert checkpoints.latest_step() == 1


@pytest.mark.slow
def test_sigterm_during_a_mid_run_evaluation_stops_both_processes_between_batches(
    tmp_path, data_dir):
  """A long evaluation (the whole validation split of tiny shakespeare, about 430 batches) after
  step 2; the second process is signalled as it starts: both stop inside it, at step 2."""
  workdir = tmp_path / 'run'
  config = smoke_config(data_dir)
  config.data.source = SHAKESPEARE
  documents(config.data, 'train')  # prepared before the processes read it
  processes = _launch('train', workdir, data_dir, '--config.train.num_steps=50',
                      '--config.eval.every_steps=2', '--config.eval.max_batches=None',
                      '--config.eval.batch_size=8', f'--config.data.source={SHAKESPEARE}',
                      processes=2)
  _sigterm_second(processes, workdir, lambda text: '"step": 2' in text).join()
  results = _results(processes)
  assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
  stopped = _stopped_line(results[0][1])
  assert 'SIGTERM (on another process)' in stopped and 'checkpoint saved at step 2' in stopped
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['split'] for r in rows] == ['train', 'train']  # the evaluation was not finished
  assert Checkpoints(str(workdir / 'checkpoints'), 2, 3).latest_step() == 2
