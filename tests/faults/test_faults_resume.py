"""A resume never throws good checkpoints away for the wrong reason: a changed setting is refused
with one line naming the field and nothing on disk changes; a run with nothing left but set-aside
steps does not restart silently; a torn last line of metrics.jsonl is expected after a crash."""
import hashlib
import os

import pytest

from helpers import run_cli as _moejax, smoke_config, train_args as _train
from moejax.train import loop
from moejax.train.checkpoint import CheckpointError


def _snapshot(directory) -> dict[str, str]:
  """{relative path: SHA-256} of every file under `directory`."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return files


def _eval_nll(capsys, workdir) -> str:
  status, out, err = _moejax(capsys, 'eval', '--workdir', workdir)
  assert status == 0, err
  return out[out.index('{'):]


@pytest.mark.parametrize('override,field', [
    ('train.optimizer=adafactor', 'train.optimizer'),
    ('model.ffn_dim=128', 'model.ffn_dim'),
    ('model.num_experts=8', 'model.num_experts'),
])
def test_a_changed_setting_is_refused_and_nothing_changes(override, field, copy_run, tfds_dir,
                                                           capsys):
  before, evaluated = _snapshot(copy_run), _eval_nll(capsys, copy_run)
  status, _, err = _moejax(capsys, *_train(copy_run, tfds_dir, f'--config.{override}',
                                           '--config.train.num_steps=6'))
  assert status == 2
  (line,) = err.strip().splitlines()
  assert line.startswith('moejax train: the checkpoint at step 5 ') and f'{field}: ' in line
  assert '(saved) -> ' in line and 'Nothing was changed' in line
  assert _snapshot(copy_run) == before  # config.json, checkpoints, metrics, lock: byte for byte
  assert _eval_nll(capsys, copy_run) == evaluated
  status, _, err = _moejax(capsys, *_train(copy_run, tfds_dir, '--config.train.num_steps=6'))
  assert status == 0, err  # the saved settings resume
  assert '6' in os.listdir(copy_run / 'checkpoints')


@pytest.mark.slow
def test_a_changed_weight_decay_that_reshapes_adafactor_is_refused(tfds_dir, tmp_path, capsys):
  workdir = tmp_path / 'run'
  adafactor = ('--config.train.optimizer=adafactor', '--config.train.num_steps=2')
  status, _, err = _moejax(capsys, *_train(workdir, tfds_dir, *adafactor))
  assert status == 0, err
  before = _snapshot(workdir)
  status, _, err = _moejax(capsys, *_train(workdir, tfds_dir, *adafactor,
                                           '--config.train.weight_decay=0.0'))
  assert status == 2 and 'train.weight_decay: 0.1 (saved) -> 0.0 (now)' in err, err
  assert _snapshot(workdir) == before


def test_set_aside_steps_without_checkpoints_are_not_a_fresh_start(copy_run, tfds_dir, capsys):
  aside = copy_run / 'set_aside_checkpoints'
  aside.mkdir()
  for step in ('2', '4', '5'):
    os.rename(copy_run / 'checkpoints' / step, aside / f'{step}-20261204-000000')
  before = _snapshot(copy_run)
  status, _, err = _moejax(capsys, *_train(copy_run, tfds_dir))
  assert status == 1
  (line,) = err.strip().splitlines()
  assert 'has no checkpoint, but' in line and '--restart' in line and 'mv ' in line
  assert _snapshot(copy_run) == before
  with pytest.raises(CheckpointError, match='--restart'):
    loop.train(smoke_config(tfds_dir), str(copy_run), quiet=True)

  status, _, err = _moejax(capsys, *_train(copy_run, tfds_dir, '--restart'))
  assert status == 0, err
  (previous,) = os.listdir(copy_run / 'previous_runs')
  kept = copy_run / 'previous_runs' / previous
  assert sorted(os.listdir(kept / 'set_aside_checkpoints')) == [
      f'{step}-20261204-000000' for step in (2, 4, 5)]
  assert {'config.json', 'metrics.jsonl', 'set_aside_checkpoints'} <= set(os.listdir(kept))
  assert sorted(os.listdir(copy_run / 'checkpoints')) == ['2', '4', '5']  # trained afresh


def test_a_torn_last_metrics_line_is_skipped_and_appended_after(copy_run, tfds_dir, capsys):
  metrics = copy_run / 'metrics.jsonl'
  with open(metrics, 'a') as f:
    f.write('{"step": 6, "split": "tra')  # kill -9 mid-write
  with pytest.warns(UserWarning, match='skipping torn line 7 '):
    status, _, err = _moejax(capsys, 'analyze', '--workdir', copy_run, '--max_tokens', 64)
  assert status == 0, err
  assert _eval_nll(capsys, copy_run)
  status, _, err = _moejax(capsys, *_train(copy_run, tfds_dir, '--config.train.num_steps=6'))
  assert status == 0, err
  lines = metrics.read_text().splitlines()
  assert lines[-3] == '{"step": 6, "split": "tra'  # left as it was, the new rows after it
  assert '"step": 6, "split": "train"' in lines[-2] and '"split": "eval"' in lines[-1]


def test_a_broken_config_json_is_one_line_naming_it(copy_run, capsys):
  (copy_run / 'config.json').write_text('{"model": {"num_experts": 4,')
  status, _, err = _moejax(capsys, 'eval', '--workdir', copy_run)
  assert status == 2
  (line,) = err.strip().splitlines()
  assert line.startswith(f'moejax eval: {copy_run / "config.json"} is not valid JSON')
