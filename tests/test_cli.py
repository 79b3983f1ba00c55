"""The command line: --help, one-line config errors, overrides, train / eval / sample in this
process (`cli.main`), and SIGTERM then resume across a real process boundary."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from helpers import (SMOKE_CONFIG, run_cli as _moejax, sigterm_once_logged, smoke_config,
                     train_args as _train_args)
from moejax import cli
from moejax.train import loop
from moejax.train.resume import load


def _json(out: str) -> dict:
  return json.loads(out[out.index('{'):])


def test_help_lists_the_commands_and_their_flags(capsys):
  status, top, _ = _moejax(capsys, '--help')
  assert status == 0 and all(c in top for c in ('train', 'eval', 'sample', 'analyze', 'ablate'))
  status, train, _ = _moejax(capsys, 'train', '--help')
  assert status == 0
  for flag in ('--config', '--workdir', '--print_config', '--restart', '--debug',
               '--config.<section>'):
    assert flag in train
  assert '--step' in _moejax(capsys, 'eval', '--help')[1]
  analyze = _moejax(capsys, 'analyze', '--help')[1]
  assert all(flag in analyze for flag in ('--text', '--out', '--at_init', '--max_tokens'))
  status, ablate, _ = _moejax(capsys, 'ablate', '--help')
  assert status == 0
  assert all(flag in ablate for flag in ('--report', '--scale', '--runs_dir'))


def test_a_config_error_is_one_line_naming_the_field(tmp_path, tfds_dir, capsys):
  args = _train_args(tmp_path / 'run', tfds_dir, '--config.model.top_p=2.0',
                     '--config.model.num_selected_experts=2')
  status, _, err = _moejax(capsys, *args)
  assert status == 2
  assert err.strip().splitlines() == [
      "moejax train: model.top_p=2.0 is invalid: it must be in (0, 1], with routing="
      "'tokens_choose', num_selected_experts >= 2 (the cap), score_function='softmax', and none "
      "of random_routing, balancing_bias, softmax_after_top_k, num_selected_groups."]
  assert not (tmp_path / 'run').exists()
  with pytest.raises(ValueError, match='model.top_p'):  # --debug: the exception, traceback and all
    cli.main(['moejax', *args, '--debug'])


def test_print_config_shows_fields_set_from_and_to_none(capsys):
  status, out, err = _moejax(capsys, 'train', '--config', SMOKE_CONFIG, '--print_config',
                             '--config.model.group_size=16', '--config.model.top_p', '0.5',
                             '--config.model.num_selected_experts=2', '--config.model.head_dim=8',
                             '--config.model.eval_capacity_factor=None',
                             '--config.eval.max_batches=None')
  assert status == 0, err
  config = json.loads(out)
  assert config['model']['group_size'] == 16 and config['model']['top_p'] == 0.5
  assert config['model']['head_dim'] == 8
  assert config['model']['eval_capacity_factor'] is None and config['eval']['max_batches'] is None
  assert config['model']['dispatch'] == 'auto'


@pytest.mark.slow
def test_train_eval_sample_from_the_command_line(tmp_path, tfds_dir, capsys):
  workdir = tmp_path / 'run'
  status, out, err = _moejax(capsys, *_train_args(workdir, tfds_dir,
                                                  '--config.model.num_experts=2',
                                                  '--config.model.group_size=16'))
  assert status == 0, err[-3000:]
  assert 'validation loss' in out and 'nats/char' in out and '--- sample' in out
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['num_experts'] == 2  # the overrides reached the run
  assert saved['model']['group_size'] == 16
  assert os.path.isabs(saved['data']['source'])
  assert '5' in os.listdir(workdir / 'checkpoints')
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert sum(l['split'] == 'train' for l in lines) == 5

  status, out, err = _moejax(capsys, 'eval', '--workdir', workdir)
  assert status == 0, err[-3000:]
  metrics = _json(out)
  last_eval = [l for l in lines if l['split'] == 'eval'][-1]
  np.testing.assert_allclose(metrics['nll'], last_eval['nll'], rtol=1e-5)
  train_metrics = [l for l in lines if l['split'] == 'train']
  assert {'learning_rate', 'router_confidence', 'load_balancing_loss/decoder/unit_0/block_1'
          } <= set(train_metrics[-1])

  # From another directory, under overrides of the saved config: one slot per expert and group
  # (C = 1 of 16 tokens, 2 experts: at least 14 of 16 choices dropped), then dropless.
  status, out, err = _moejax(capsys, 'eval', '--workdir', workdir,
                             '--config.model.eval_capacity_factor=0.1',
                             '--config.model.min_expert_capacity=1', cwd=tmp_path)
  assert status == 0, err[-3000:]
  tight = _json(out)
  assert tight['fraction_dropped'] >= 14 / 16 and tight['nll'] > metrics['nll']
  status, out, err = _moejax(capsys, 'eval', '--workdir', workdir,
                             '--config.model.eval_capacity_factor=None', cwd=tmp_path)
  assert status == 0, err[-3000:]
  assert _json(out)['fraction_dropped'] == 0

  status, out, err = _moejax(capsys, 'sample', '--workdir', workdir, '--prompt', 'The Time',
                             '--num_tokens', '25', '--temperature', '0')
  assert status == 0, err[-3000:]
  text = out.split('---\n', 1)[1]
  assert text.startswith('The Time') and len(text) > len('The Time')


def test_bad_override_is_rejected_before_training(tmp_path, tfds_dir, capsys):
  status, _, err = _moejax(capsys, *_train_args(tmp_path / 'run', tfds_dir,
                                                '--config.model.num_expert=16'))
  assert status == 2 and 'num_expert' in err
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_sigterm_saves_and_the_resumed_run_ends_like_an_uninterrupted_one(tmp_path, tfds_dir):
  """A real process and a real signal: the run saves where it stopped and exits 0; the resumed
  run's parameters equal an uninterrupted run's, bit for bit."""
  steps, workdir = 60, tmp_path / 'run'
  args = _train_args(workdir, tfds_dir, f'--config.train.num_steps={steps}',
                     '--config.checkpoint.every_steps=1000')
  rc, out, err = sigterm_once_logged([sys.executable, '-m', 'moejax.cli', *args],
                                     workdir / 'metrics.jsonl', timeout=180)
  assert rc == 0, err[-3000:]
  assert 'stopped by SIGTERM' in out
  # Orbax saves the first step; the next periodic save would be at 1000: the SIGTERM made this one.
  stopped_at = max(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert 3 <= stopped_at < steps
  assert f'checkpoint saved at step {stopped_at}' in out

  config = smoke_config(tfds_dir, num_steps=steps)
  config.checkpoint.every_steps = 1000
  resumed = loop.train(config, str(workdir), quiet=True)
  assert resumed['step'] == steps
  _, interrupted = load(config, str(workdir))
  uninterrupted = loop.train(config, str(tmp_path / 'straight'), quiet=True)
  assert int(interrupted.step) == steps
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(interrupted.params),
               jax.device_get(uninterrupted['state'].params))
