"""What a new user runs into first: a run whose routing groups span sequences samples, an empty
corpus, a metrics.jsonl torn in the middle, and an output path that is a file, each a working
command or one line naming what to fix (exit 2)."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import SMOKE_CONFIG, run_cli, train_args
from moejax.ablate import read_rows
from moejax.models import ModelConfig, make_model
from moejax.train.metrics import read_metrics
from moejax.train.sampling import generate


def _one_line(err: str) -> str:
  """The only line of stderr (no traceback, no second line)."""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
  return lines[0]


@pytest.mark.slow
def test_a_run_grouped_across_sequences_samples(tmp_path, tfds_dir, capsys):
  """Groups of 64 tokens over sequences of 32 (two sequences a group): training ends with its
  sample, and `moejax sample` on the saved run gives text."""
  workdir = tmp_path / 'run'
  status, out, err = run_cli(capsys, *train_args(workdir, tfds_dir, '--config.model.group_size=64',
                                                 '--config.train.num_steps=2',
                                                 '--config.sample.num_tokens=8'))
  assert status == 0, err[-3000:]
  assert '--- sample' in out
  status, out, err = run_cli(capsys, 'sample', '--workdir', workdir, '--prompt', 'The Time',
                             '--num_tokens', '12', '--temperature', '0')
  assert status == 0, err[-3000:]
  text = out.split('---\n', 1)[1]
  assert text.startswith('The Time') and len(text) > len('The Time')


@pytest.mark.slow
def test_cached_and_uncached_sampling_agree_when_groups_do_not_fit_the_window():
  """group_size 2L (and one that does not divide L): sampling routes each window as one group,
  with and without the cache alike."""
  length = 8
  for group_size in (2 * length, 12):
    config = ModelConfig(vocab_size=20, num_layers=2, model_dim=16, num_heads=2, ffn_dim=16,
                         num_experts=4, moe_every=1, group_size=group_size,
                         eval_capacity_factor=0.5, min_expert_capacity=1)
    model = make_model(config)
    ids = jnp.ones((group_size // 4, length), jnp.int32)  # a training batch the groups divide
    params = model.init(jax.random.key(0), ids, ids > 0, True)['params']
    prompt = np.array([3, 4, 5], np.int32)
    cached = generate(model, params, prompt, length - 4, length, 0.0, 0)
    uncached = generate(model, params, prompt, length - 4, length, 0.0, 0, cache=False)
    assert len(cached) == length - 4
    np.testing.assert_array_equal(cached, uncached)


def test_an_empty_corpus_is_one_line_naming_it(tmp_path, capsys):
  empty = tmp_path / 'empty.txt'
  empty.write_text('')
  status, _, err = run_cli(capsys, *train_args(tmp_path / 'run', tmp_path / 'tfds',
                                               f'--config.data.source={empty}'))
  assert status == 2
  assert _one_line(err) == (f'moejax train: data.source {empty} is empty: there is no text to '
                            'train on')
  one = tmp_path / 'one.txt'
  one.write_text('x')  # one character: the train split would get none
  status, _, err = run_cli(capsys, *train_args(tmp_path / 'run', tmp_path / 'tfds',
                                               f'--config.data.source={one}'))
  assert status == 2 and f'data.source {one} is too short (1 characters)' in _one_line(err)


def _torn_metrics(path) -> list[dict]:
  """A metrics.jsonl torn by a crash at line 3, resumed after it, torn again at its end (line 6):
  the good rows."""
  rows = [{'step': s, 'split': 'train', 'nll': 3.0 - s / 10} for s in (1, 2, 3, 4)]
  lines = [json.dumps(rows[0]), json.dumps(rows[1]), '{"step": 3, "spl', json.dumps(rows[2]),
           json.dumps(rows[3]), '{"step": 5, "split": "tr']
  path.write_text('\n'.join(lines))
  return rows


def test_torn_metrics_lines_anywhere_are_skipped_with_one_warning(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = _torn_metrics(path)
  with pytest.warns(UserWarning) as caught:
    assert read_metrics(str(path)) == rows
  assert [str(w.message) for w in caught] == [
      f'{path}: skipping torn lines 3, 6 (cut short by a crash while writing)']
  with pytest.warns(UserWarning, match='torn lines 3, 6'):  # a caller: ablate's records
    assert [r['step'] for r in read_rows(str(tmp_path))] == [1, 2, 3, 4]
  path.write_text(json.dumps(rows[0]) + '\n')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert read_metrics(str(path)) == rows[:1]  # nothing torn: no warning


def test_analyze_reads_a_metrics_file_torn_in_the_middle(copy_run, capsys):
  metrics = copy_run / 'metrics.jsonl'
  lines = metrics.read_text().splitlines()
  torn = lines[:2] + ['{"step": 2, "split": "tra'] + lines[2:] + ['{"step": 6']
  metrics.write_text('\n'.join(torn))
  with pytest.warns(UserWarning, match=f'skipping torn lines 3, {len(torn)} '):
    status, out, err = run_cli(capsys, 'analyze', '--workdir', copy_run, '--max_tokens', 64)
  assert status == 0, err[-3000:]
  assert 'usage_over_training.png' in out


def _output_path_cases():
  """(arguments, the path they name) of every command, with FILE an existing regular file."""
  run = ('--workdir', 'RUN')
  return {
      'train --workdir FILE': (('train', '--config', SMOKE_CONFIG, '--workdir', 'FILE'), 'FILE'),
      'train --workdir FILE/run': (('train', '--config', SMOKE_CONFIG, '--workdir', 'FILE/run'),
                                   'FILE'),
      'eval --workdir FILE': (('eval', '--workdir', 'FILE'), 'FILE'),
      'sample --workdir FILE': (('sample', '--workdir', 'FILE'), 'FILE'),
      'analyze --out FILE': (('analyze', *run, '--out', 'FILE'), 'FILE'),
      'analyze --out FILE/sub': (('analyze', *run, '--out', 'FILE/sub'), 'FILE'),
      'import-hf --workdir FILE': (('import-hf', 'RUN', '--workdir', 'FILE'), 'FILE'),
      'export-hf --out FILE': (('export-hf', *run, '--out', 'FILE'), 'FILE'),
      'ablate --runs_dir FILE': (('ablate', 'experts', '--runs_dir', 'FILE'), 'FILE'),
      'ablate --results_dir FILE': (('ablate', 'experts', '--results_dir', 'FILE/x'), 'FILE'),
  }


@pytest.mark.parametrize('case', list(_output_path_cases()))
def test_an_output_path_that_is_a_file_is_one_line_naming_it(case, tmp_path, capsys):
  args, named = _output_path_cases()[case]
  a_file, run = tmp_path / 'file', tmp_path / 'run'
  a_file.write_text('not a directory\n')
  run.mkdir()
  places = {'FILE': str(a_file), 'RUN': str(run)}
  args = [arg.replace('FILE', places['FILE']).replace('RUN', places['RUN']) for arg in args]
  status, _, err = run_cli(capsys, *args)
  assert status == 2
  line = _one_line(err)
  assert line.startswith(f'moejax {args[0]}: --') and places[named] in line, line
  assert a_file.read_text() == 'not a directory\n'
