"""The command line, end to end in subprocesses: train / eval / sample, and SIGTERM then resume."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import CLI_ENV, REPO, SMOKE_CONFIG, sigterm_once_logged, smoke_config
from moejax.train import loop



def _moejax(*args, timeout=240, cwd=REPO, env=CLI_ENV):
  return subprocess.run([sys.executable, '-m', 'moejax.cli', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _train_args(workdir, data_dir, *overrides):
  return ['train', '--config', SMOKE_CONFIG, '--workdir', str(workdir),
          f'--config.data.data_dir={data_dir}', *overrides]


def test_help_lists_the_commands_and_their_flags():
  top = _moejax('--help', timeout=60)
  assert top.returncode == 0 and all(c in top.stdout for c in ('train', 'eval', 'sample',
                                                               'analyze', 'ablate'))
  train = _moejax('train', '--help', timeout=60)
  assert train.returncode == 0
  for flag in ('--config', '--workdir', '--print_config', '--debug', '--config.<section>'):
    assert flag in train.stdout
  assert '--step' in _moejax('eval', '--help', timeout=60).stdout
  analyze = _moejax('analyze', '--help', timeout=60).stdout
  assert all(flag in analyze for flag in ('--text', '--out', '--at_init', '--max_tokens'))
  ablate = _moejax('ablate', '--help', timeout=60)
  assert ablate.returncode == 0
  assert all(flag in ablate.stdout for flag in ('--report', '--scale', '--runs_dir'))


def test_a_config_error_is_one_line_naming_the_field(tmp_path):
  args = _train_args(tmp_path / 'run', tmp_path / 'tfds', '--config.model.top_p=2.0',
                     '--config.model.num_selected_experts=2')
  result = _moejax(*args, timeout=60)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "moejax train: model.top_p=2.0 is invalid: it must be in (0, 1], with routing="
      "'tokens_choose', num_selected_experts >= 2 (the cap), and neither random_routing nor "
      "balancing_bias."]
  assert not (tmp_path / 'run').exists()
  debug = _moejax(*args, '--debug', timeout=60)
  assert debug.returncode != 0 and 'Traceback' in debug.stderr and 'model.top_p' in debug.stderr


def test_print_config_shows_fields_set_from_and_to_none(tmp_path):
  result = _moejax('train', '--config', SMOKE_CONFIG, '--print_config',
                   '--config.model.group_size=16', '--config.model.top_p', '0.5',
                   '--config.model.num_selected_experts=2', '--config.model.head_dim=8',
                   '--config.model.eval_capacity_factor=None', '--config.eval.max_batches=None',
                   timeout=60)
  assert result.returncode == 0, result.stderr
  config = json.loads(result.stdout)
  assert config['model']['group_size'] == 16 and config['model']['top_p'] == 0.5
  assert config['model']['head_dim'] == 8
  assert config['model']['eval_capacity_factor'] is None and config['eval']['max_batches'] is None
  assert config['model']['dispatch'] == 'auto'


@pytest.mark.slow
def test_train_eval_sample_from_the_command_line(tmp_path):
  workdir = tmp_path / 'run'
  train = _moejax(*_train_args(workdir, tmp_path / 'tfds', '--config.model.num_experts=2',
                               '--config.model.group_size=16'))
  assert train.returncode == 0, train.stderr[-3000:]
  assert 'validation loss' in train.stdout and 'nats/char' in train.stdout
  assert '--- sample' in train.stdout
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['num_experts'] == 2  # the overrides reached the run
  assert saved['model']['group_size'] == 16
  assert os.path.isabs(saved['data']['source'])
  assert '5' in os.listdir(workdir / 'checkpoints')
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert sum(json.loads(l)['split'] == 'train' for l in lines) == 5

  evaluated = _moejax('eval', '--workdir', str(workdir))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  metrics = json.loads(evaluated.stdout[evaluated.stdout.index('{'):])
  last_eval = [json.loads(l) for l in lines if json.loads(l)['split'] == 'eval'][-1]
  np.testing.assert_allclose(metrics['nll'], last_eval['nll'], rtol=1e-5)
  train_metrics = [json.loads(l) for l in lines if json.loads(l)['split'] == 'train']
  assert {'learning_rate', 'router_confidence', 'load_balancing_loss/decoder/unit_0/block_1'
          } <= set(train_metrics[-1])

  # From another directory, under overrides of the saved config: one slot per expert and group
  # (C = 1 of 16 tokens, 2 experts: at least 14 of 16 choices dropped), then dropless.
  tight = _moejax('eval', '--workdir', str(workdir), '--config.model.eval_capacity_factor=0.1',
                  '--config.model.min_expert_capacity=1', cwd=tmp_path)
  assert tight.returncode == 0, tight.stderr[-3000:]
  tight = json.loads(tight.stdout[tight.stdout.index('{'):])
  assert tight['fraction_dropped'] >= 14 / 16 and tight['nll'] > metrics['nll']
  dropless = _moejax('eval', '--workdir', str(workdir),
                     '--config.model.eval_capacity_factor=None', cwd=tmp_path)
  assert dropless.returncode == 0, dropless.stderr[-3000:]
  dropless = json.loads(dropless.stdout[dropless.stdout.index('{'):])
  assert dropless['fraction_dropped'] == 0

  sample = _moejax('sample', '--workdir', str(workdir), '--prompt', 'The Time',
                   '--num_tokens', '25', '--temperature', '0')
  assert sample.returncode == 0, sample.stderr[-3000:]
  text = sample.stdout.split('---\n', 1)[1]
  assert text.startswith('The Time') and len(text) > len('The Time')


def test_bad_override_is_rejected_before_training(tmp_path):
  result = _moejax(*_train_args(tmp_path / 'run', tmp_path / 'tfds',
                                '--config.model.num_expert=16'), timeout=60)
  assert result.returncode != 0 and 'num_expert' in result.stderr
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_sigterm_saves_and_the_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
  steps, workdir, data_dir = 150, tmp_path / 'run', tmp_path / 'tfds'
  args = _train_args(workdir, data_dir, f'--config.train.num_steps={steps}',
                     '--config.checkpoint.every_steps=1000')
  rc, out, err = sigterm_once_logged([sys.executable, '-m', 'moejax.cli', *args],
                                     workdir / 'metrics.jsonl', timeout=180)
  assert rc == 0, err[-3000:]
  assert 'stopped by SIGTERM' in out
  # Orbax saves the first step; the next periodic save would be at 1000: the SIGTERM made this one.
  stopped_at = max(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert 3 <= stopped_at < steps
  assert f'checkpoint saved at step {stopped_at}' in out

  resumed = _moejax(*args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  config = smoke_config(data_dir, num_steps=steps)
  _, interrupted = loop.load(config, str(workdir))
  uninterrupted = loop.train(config, str(tmp_path / 'straight'), quiet=True)
  assert int(interrupted.step) == steps
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(interrupted.params),
               jax.device_get(uninterrupted['state'].params))
