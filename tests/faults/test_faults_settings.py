"""Every invalid setting is refused before anything compiles, with the field named."""
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, SMOKE_CONFIG, run_cli, smoke_config
from moejax.errors import ConfigError
from moejax.train import loop
from moejax.train.config import apply_overrides, check_config

# (override, the field the error must name): each runs wrong or crashes late without the check.
INVALID = [
    ('train.learning_rate=-0.001', 'train.learning_rate'),   # gradient ascent
    ('train.learning_rate=0', 'train.learning_rate'),
    ('train.grad_clip_norm=-1.0', 'train.grad_clip_norm'),
    ('train.b1=1.5', 'train.b1'),
    ('train.b2=-0.1', 'train.b2'),
    ('train.weight_decay=-0.1', 'train.weight_decay'),
    ('train.batch_size=0', 'train.batch_size'),
    ('train.num_steps=0', 'train.num_steps'),
    ('train.warmup_steps=-5', 'train.warmup_steps'),
    ('train.load_balancing_loss_coef=-0.01', 'train.load_balancing_loss_coef'),
    ('train.router_z_loss_coef=-1e-3', 'train.router_z_loss_coef'),
    ('train.max_nonfinite_in_a_row=0', 'train.max_nonfinite_in_a_row'),
    ('train.log_every=0', 'train.log_every'),                # ZeroDivisionError after compiling
    ('train.schedule=linear', 'train.schedule'),
    ('train.optimizer=sgd', 'train.optimizer'),
    ('eval.every_steps=0', 'eval.every_steps'),
    ('eval.batch_size=-8', 'eval.batch_size'),
    ('eval.max_batches=0', 'eval.max_batches'),
    ('checkpoint.every_steps=0', 'checkpoint.every_steps'),
    ('checkpoint.keep=0', 'checkpoint.keep'),                 # would keep no checkpoint at all
    ('model.dropout_rate=1.5', 'model.dropout_rate'),
    ('model.activation=swish', 'model.activation'),          # the dense FFN's too
    ('model.num_experts=0', 'model.num_experts'),
    ('model.train_capacity_factor=-1.0', 'model.train_capacity_factor'),
    ('mesh.data=-1', 'mesh.data'),                           # silently one device before
    ('mesh.data=16', 'mesh.data'),                           # more devices than exist (8)
    ('mesh.expert=3', 'mesh.expert'),                        # does not divide E = 4
    ('mesh.model=3', 'mesh.model'),                          # does not divide F = 64
    ('data.length=1', 'data.length'),
    ('data.validation_fraction=1.5', 'data.validation_fraction'),
    ('seed=4294967296', 'config.seed'),                     # past the data shuffle's 32 bits
    ('sample.temperature=-1.0', 'sample.temperature'),
    ('sample.num_tokens=0', 'sample.num_tokens'),
    ('seed=-1', 'config.seed'),
    ('upcycle.noise_std=-0.5', 'upcycle.noise_std'),
    ('model.group_size=24', 'model.group_size'),             # does not divide 8 x 32 tokens
]


@pytest.mark.parametrize('override,field', INVALID, ids=[o for o, _ in INVALID])
def test_invalid_setting_is_refused_naming_the_field(override, field, tmp_path):
  config = apply_overrides(smoke_config(tmp_path), [tuple(override.split('=', 1))])
  with pytest.raises(ConfigError) as error:
    check_config(config)
  assert str(error.value).startswith(f'{field}='), str(error.value)


@pytest.mark.parametrize('mesh,batch', [((2, 2, 1), 6), ((2, 1, 1), 7)])
def test_batch_must_split_over_the_mesh(mesh, batch, tmp_path):
  config = smoke_config(tmp_path)
  config.mesh.update(data=mesh[0], expert=mesh[1], model=mesh[2])
  config.train.batch_size = batch
  with pytest.raises(ConfigError, match=r'^train.batch_size=\d+ is invalid: .*mesh.data x mesh.expert'):
    check_config(config)


@pytest.mark.slow
def test_a_valid_group_size_larger_than_one_row_is_accepted(tmp_path, tfds_dir):
  config = smoke_config(tfds_dir, num_steps=2)
  config.model.group_size = 64  # 2 rows of 32 tokens; a batch-1 initialization has only 32
  summary = loop.train(config, str(tmp_path / 'run'), quiet=True)
  assert summary['step'] == 2 and summary['eval']['nll'] > 0


def test_misspelt_fields_in_every_section_of_an_experiment_file(tmp_path):
  for section, field in (('train', 'learning_rte'), ('eval', 'every_step'), ('data', 'lenght'),
                         ('checkpoint', 'kep'), ('mesh', 'experts'), ('sample', 'temprature')):
    config = smoke_config(tmp_path)
    config[section][field] = 1  # what `config.train.learning_rte = 1` in a file does
    with pytest.raises(ConfigError, match=rf'^{section}.{field}=1 is invalid: no such field; '
                                          r'did you mean'):
      check_config(config)
  config = smoke_config(tmp_path)
  config.sede = 1
  with pytest.raises(ConfigError, match=r"^config.sede=1 is invalid: no such field; did you "
                                        r"mean seed\?"):
    check_config(config)


@pytest.mark.slow
def test_the_cli_refuses_before_compiling_with_one_line(tmp_path):
  experiment = tmp_path / 'experiment.py'
  experiment.write_text(f'from importlib.machinery import SourceFileLoader\n'
                        f'smoke = SourceFileLoader("smoke", {os.path.join(REPO, SMOKE_CONFIG)!r})'
                        '.load_module()\n\n'
                        'def get_config():\n'
                        '  config = smoke.get_config()\n'
                        '  config.train.learning_rte = 1e-3\n'
                        '  return config\n')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  for args in (['--config', str(experiment)],
               ['--config', SMOKE_CONFIG, '--config.train.learning_rate=-1e-3'],
               ['--config', SMOKE_CONFIG, '--config.mesh.data=-1']):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, '-m', 'moejax.cli', 'train', '--workdir',
                             str(tmp_path / 'run'), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith('moejax train: ') and ' is invalid: ' in line
    assert not (tmp_path / 'run').exists()
    assert time.perf_counter() - start < 60


def test_sample_flags_are_checked_like_config_fields(tmp_path, tfds_dir):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  (tmp_path / 'run').mkdir()
  config = smoke_config(tfds_dir)
  (tmp_path / 'run' / 'config.json').write_text(config.to_json())
  result = subprocess.run([sys.executable, '-m', 'moejax.cli', 'sample', '--workdir',
                           str(tmp_path / 'run'), '--temperature=-1'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == ('moejax sample: sample.temperature=-1.0 is invalid: it must '
                                   'be a number >= 0 (0: greedy).')


# Every string field that names a choice, with a value it does not allow.
STRING_CHOICES = [('data.tokenizer', 'bpe'), ('train.optimizer', 'sgd'),
                  ('train.schedule', 'linear'), ('task', 'lm2'), ('model.positions', 'alibi'),
                  ('model.activation', 'swish'), ('model.routing', 'random'),
                  ('model.dispatch', 'fast'), ('model.router', 'mlp'),
                  ('model.router_dtype', 'float64'), ('model.dtype', 'float16'),
                  ('model.load_balancing_loss_scale', 'per_group'),
                  ('model.kind', 'encoder')]


def _cli(capsys, *args) -> tuple[int, list[str]]:
  """`moejax ARGS` in this process: (exit status, stderr lines)."""
  status, _, err = run_cli(capsys, *args)
  return status, err.strip().splitlines()


@pytest.mark.parametrize('field,value', STRING_CHOICES, ids=[f for f, _ in STRING_CHOICES])
def test_a_bad_string_value_is_one_line_listing_the_choices(field, value, capsys):
  status, lines = _cli(capsys, 'train', '--config', SMOKE_CONFIG, '--print_config',
                       f'--config.{field}={value}')
  assert status == 2 and len(lines) == 1, lines
  owner, _, name = field.rpartition('.')
  assert lines[0].startswith(f"moejax train: {owner or 'config'}.{name}={value!r} is invalid: ")
  if field == 'model.kind':  # the task allows one kind
    assert "task='lm' needs model.kind='decoder'" in lines[0]
  else:
    assert 'one of (' in lines[0]


def test_paths_of_the_wrong_kind_broken_files_and_infinities_are_one_line(tmp_path, capsys):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n')
  not_a_config = tmp_path / 'empty.py'
  not_a_config.write_text('x = 1\n')
  a_file = tmp_path / 'file'
  a_file.write_text('')
  cases = [
      (('train', '--config', tmp_path, '--print_config'), 'is a directory'),
      (('train', '--config', broken, '--print_config'), 'line 1 is not valid Python'),
      (('train', '--config', not_a_config, '--print_config'), 'has no get_config() function'),
      (('train', '--config', SMOKE_CONFIG, '--workdir', a_file), 'is a file'),
      (('eval', '--workdir', a_file), 'is a file'),
      (('eval', '--workdir', tmp_path / 'nothing'), 'not a run directory'),
      (('train', '--config', SMOKE_CONFIG, '--print_config',
        '--config.train.learning_rate=1e999'), 'train.learning_rate=inf is invalid: it must be '
                                               'a finite number'),
      (('train', '--config', SMOKE_CONFIG, '--print_config',
        '--config.model.train_capacity_factor=1e999'), 'model.train_capacity_factor=inf'),
      (('ablate', tmp_path), 'is a directory'),
      (('ablate', broken), 'line 1 is not valid Python'),
  ]
  for args, message in cases:
    status, lines = _cli(capsys, *args)
    assert status == 2 and len(lines) == 1 and message in lines[0], (args, lines)
  assert not (tmp_path / 'nothing').exists()


def test_an_empty_text_to_analyze_is_one_line(smoke_run, tmp_path, capsys):
  empty = tmp_path / 'empty.txt'
  empty.write_text('')
  status, lines = _cli(capsys, 'analyze', '--workdir', smoke_run[0], '--text', empty,
                       '--out', tmp_path / 'out')
  assert status == 2 and lines == ['moejax analyze: the text to analyze has 0 token(s); it '
                                   'needs at least 2'], lines
