"""What a sweep commits to the repository, and reading it back: the verdicts are rebuilt from
these files alone, and a later sitting skips the runs they hold.

  <results_dir>/<name>.csv             one row per finished run and seed (and EVALS variant):
                                       'run', ['eval'], the overridden fields, 'seed', the
                                       record's numbers, 'config_hash'
  <results_dir>/<name>_curves.csv      run, seed, step, nll: every validation evaluation
  <results_dir>/<name>_step_times.csv  run, round, step_time: train-step seconds timed
                                       round-robin in one process (benchmarks/sweep_step_time.py)

A config's hash is over the fields where it differs from `moejax.train.default_config()`, as
written (relative paths stay relative): the same run has the same hash on every machine, and a
field added to the defaults later leaves the committed runs' hashes as they were.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import types
from collections.abc import Iterable, Mapping

import ml_collections

from moejax.ablate.verdict import SweepNumbers

CURVE_COLUMNS = ('run', 'seed', 'step', 'nll')
STEP_TIME_COLUMNS = ('run', 'round', 'step_time')


TEXT = ('run', 'eval', 'config_hash')  # never read as numbers


def config_hash(config: ml_collections.ConfigDict) -> str:
  """'c' and 12 hex digits of the fields where `config` differs from the defaults."""
  from moejax.ablate.records import flatten
  defaults = _default_fields()
  fields = flatten(json.loads(config.copy_and_resolve_references().to_json()))
  changed = {k: v for k, v in fields.items() if k not in defaults or defaults[k] != v}
  text = json.dumps(changed, sort_keys=True)
  return 'c' + hashlib.sha256(text.encode()).hexdigest()[:12]


@functools.cache
def _default_fields() -> Mapping[str, object]:
  """{'section.field': value} of `moejax.train.default_config()` (read-only: it is shared)."""
  from moejax.ablate.records import flatten
  from moejax.train import default_config
  return types.MappingProxyType(flatten(json.loads(default_config().to_json())))


def paths(results_dir: str, name: str) -> dict[str, str]:
  stem = os.path.join(results_dir, name)
  return {'rows': stem + '.csv', 'curves': stem + '_curves.csv',
          'step_times': stem + '_step_times.csv'}


def parse(text: str):
  """A csv cell as the value it was written from: '' None, 'True'/'False', int, float, str."""
  if text == '':
    return None
  if text in ('True', 'False'):
    return text == 'True'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def read_csv(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    return [{k: (v or None) if k in TEXT else parse(v) for k, v in row.items()}
            for row in csv.DictReader(f)]


def write_csv(path: str, rows: Iterable[Mapping], columns: Iterable[str] | None = None):
  rows = list(rows)
  columns = list(columns or dict.fromkeys(k for row in rows for k in row))
  with open(path + '.tmp', 'w', newline='') as f:
    writer = csv.DictWriter(f, columns, lineterminator='\n')
    writer.writeheader()
    writer.writerows({k: '' if row.get(k) is None else row[k] for k in columns} for row in rows)
  os.replace(path + '.tmp', path)  # whole or not at all


def curve_rows(results: Iterable[Mapping]) -> list[dict]:
  """The curves csv's rows of finished runs' results."""
  return [{'run': r['name'], 'seed': r['seed'], 'step': point['step'], 'nll': point['nll']}
          for r in results for point in r['curve']]


def read_numbers(results_dir: str, name: str) -> SweepNumbers:
  """Everything the verdicts of sweep `name` rest on, from its committed files."""
  files = paths(results_dir, name)
  curves = {}
  for row in read_csv(files['curves']):
    curves.setdefault((row['run'], row['seed']), []).append((row['step'], row['nll']))
  step_times = {}
  for row in read_csv(files['step_times']):
    step_times.setdefault(row['run'], {})[row['round']] = row['step_time']
  return SweepNumbers(rows=read_csv(files['rows']), curves=curves, step_times=step_times)
