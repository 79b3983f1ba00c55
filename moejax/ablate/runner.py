"""Running a sweep: each run in its own work directory, finished runs skipped, stops resumable.

  <runs_dir>/<sweep>/<run name>/seed<seed>/   the run's work directory (`moejax.train.loop`'s:
                                              checkpoints/, metrics.jsonl, config.json), plus
      result.json                             written once the run is trained and evaluated:
                                              its record, curve, EVALS and config
      wall_seconds.json                       wall time of its sessions that ended cleanly

A run is finished when its result.json exists and holds the same config; a different config
is an error naming the fields (delete the directory, or use another --runs_dir). A run whose
config (seed included) is that of a finished run of another sweep in the same runs_dir is
copied from it, not trained again (the sweeps share their default-config runs). An unfinished
run resumes from its latest checkpoint. SIGTERM or SIGINT stops the run in flight after its
current step (it saves) and then the sweep: running the same command again goes on from there.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import time
import types
from collections.abc import Callable, Collection

import jax
import ml_collections
from tqdm import tqdm

from moejax.ablate import records
from moejax.ablate.sweep import RunSpec, Sweep, SweepError, with_overrides
from moejax.train.config import absolute_paths, default_config

RESULT = 'result.json'
WALL = 'wall_seconds.json'
LOOP = 'moejax.train.loop.train'  # a result's trainer: only its runs are shared between sweeps


def run_dir(sweep_dir: str, spec: RunSpec) -> str:
  return os.path.join(sweep_dir, spec.name, f'seed{spec.seed}')


def plain_config(config: ml_collections.ConfigDict) -> dict:
  """The config as a run saves it (config.json): resolved, local paths absolute, JSON types."""
  return json.loads(absolute_paths(config.copy_and_resolve_references()).to_json())


def check_same_config(workdir: str, saved: dict, config: dict):
  """Raise SweepError naming the fields where a run's saved config and this one differ. A field
  the saved config lacks (one moejax added after the run) counts as its default."""
  old, new = records.flatten(saved), records.flatten(config)
  old = {**records.flatten(plain_config(default_config())), **old}
  changed = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k)]
  if changed:
    raise SweepError(f'{workdir} was run with another config ({"; ".join(changed)}): delete it '
                     'to run it again, or give another --runs_dir')


def load_result(workdir: str) -> dict | None:
  path = os.path.join(workdir, RESULT)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def finished_runs(runs_dir: str) -> dict[str, str]:
  """{config (as JSON): work directory} of the finished runs of every sweep in `runs_dir`."""
  found = {}
  for path in sorted(glob.glob(os.path.join(runs_dir, '*', '*', 'seed*', RESULT))):
    with open(path) as f:
      result = json.load(f)
    if result.get('trainer') == LOOP:
      found.setdefault(json.dumps(result['config'], sort_keys=True), os.path.dirname(path))
  return found


def copy_run(spec: RunSpec, source: str, workdir: str) -> dict:
  """The finished run in `source` (the same config) copied as this spec's run; its result."""
  shutil.copytree(source, workdir, dirs_exist_ok=True)
  result = {**load_result(workdir), 'name': spec.name, 'seed': spec.seed,
            'overrides': dict(spec.overrides), 'copied_from': os.path.abspath(source)}
  _write_json(os.path.join(workdir, RESULT), result)
  return result


def _write_json(path: str, value):
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)  # a result is written whole or not at all


def _wall_seconds(workdir: str) -> float:
  path = os.path.join(workdir, WALL)
  if not os.path.exists(path):
    return 0.0
  with open(path) as f:
    return json.load(f)['seconds']


def nominal_vocab_size(config: ml_collections.ConfigDict) -> int:
  """V of a run's model from its config alone (no vocabulary trained): 259 bytes, or the
  SentencePiece vocabulary's size, plus span corruption's sentinels."""
  from moejax import data as data_lib
  size = (data_lib.ByteTokenizer.vocab_size if config.data.tokenizer == 'bytes'
          else config.data.spm_vocab_size)
  nominal = types.SimpleNamespace(vocab_size=size, added_vocab=lambda sentinels: sentinels)
  return data_lib.model_vocab_size(nominal, config.data, config.task)


def abstract_params(config: ml_collections.ConfigDict, vocab_size: int):
  """(model config, the params' shapes and dtypes) of a run's model, by `jax.eval_shape`:
  nothing is allocated."""
  from moejax.models import make_model
  from moejax.train.config import model_config
  from moejax.train.inputs import dummy_batch, model_inputs
  model_cfg = model_config(config, vocab_size)
  lengths = _lengths(config)
  model = make_model(model_cfg)
  inputs = model_inputs(model_cfg, dummy_batch(model_cfg, 1, lengths[-1], lengths[0]))
  return model_cfg, jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, True))['params']


def _lengths(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """(length,), or (inputs, targets) lengths of span corruption."""
  from moejax import data as data_lib
  if config.task != 'span_corruption':
    return (config.data.length,)
  return data_lib.span_corruption_lengths(config.data.length, config.data.noise_density,
                                          config.data.mean_span_length)


def model_size(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """{'params', 'mflops_per_token'} of the run's model, by shapes alone (`jax.eval_shape`)."""
  from moejax import data as data_lib
  from moejax.models import per_token_flops
  tokenizer = data_lib.tokenizer_for(config.data, workdir)
  vocab_size = data_lib.model_vocab_size(tokenizer, config.data, config.task)
  model_cfg, shapes = abstract_params(config, vocab_size)
  params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
  return {'params': params, 'mflops_per_token': per_token_flops(model_cfg, *_lengths(config)) / 1e6}


def evaluate_variants(spec: RunSpec, workdir: str, evals: dict, done: dict) -> dict:
  """{variant: record} of the finished run's latest checkpoint evaluated under each EVALS
  variant's overrides (those in `done` are kept)."""
  from moejax.train.evaluation import evaluate
  from moejax.train.resume import load
  out = dict(done)
  for name, overrides in evals.items():
    if name in out:
      continue
    run, state = load(with_overrides(spec.config.copy_and_resolve_references(), overrides),
                      workdir)
    metrics = evaluate(run, state.params, bias_state=state.balancing_bias_state)
    run.checkpoints.close()
    out[name] = records.eval_record(jax.device_get(metrics))
  return out


def finish(spec: RunSpec, workdir: str, trainer: str, summary: dict | None, seconds: float,
           diverged: str | None = None) -> dict:
  """Write result.json of a run whose training ended (`summary` from `trainer`, or None when it
  diverged) and return it."""
  config, summary = spec.config, summary or {}
  rows = records.read_rows(workdir)
  tokens_per_step = summary.get('tokens_per_step', config.train.batch_size * config.data.length)
  record = records.run_record(rows, tokens_per_step)
  record.update(summary.get('extra', {}))
  record.update(model_size(config, workdir), diverged=diverged is not None,
                wall_time=_wall_seconds(workdir) + seconds)
  result = {'name': spec.name, 'seed': spec.seed, 'overrides': dict(spec.overrides),
            'record': record, 'curve': records.eval_curve(rows, record['step_time']),
            'diverged': diverged, 'evals': {}, 'trainer': trainer,
            'config': plain_config(config)}
  _write_json(os.path.join(workdir, RESULT), result)
  return result


def train_run(spec: RunSpec, workdir: str, sweep: Sweep, quiet: bool) -> dict | None:
  """Train (or resume) one run; its result, or None when a signal stopped it."""
  from moejax.train import loop
  train, trainer = (sweep.train, f'{sweep.path}:TRAIN') if sweep.train else (loop.train, LOOP)
  start = time.perf_counter()
  try:
    summary = train(spec.config, workdir, quiet=quiet)
  except loop.TrainingDiverged as error:
    return finish(spec, workdir, trainer, None, time.perf_counter() - start, diverged=str(error))
  seconds = time.perf_counter() - start
  if summary.get('stopped_by'):
    _write_json(os.path.join(workdir, WALL), {'seconds': _wall_seconds(workdir) + seconds})
    return None
  return finish(spec, workdir, trainer, summary, seconds)


def one_line(result: dict) -> str:
  """A finished run in one line: its validation NLL, speed and routing numbers."""
  r = result['record']
  parts = [f'{result["name"]} seed {result["seed"]}:',
           'DIVERGED' if result['diverged'] else '',
           f'final NLL {r["final_nll"]:.4f}' if r['final_nll'] is not None else 'no evaluation',
           f'(best {r["best_nll"]:.4f})' if r['best_nll'] is not None else '',
           f'{r["tokens_per_sec"]:,.0f} tokens/s' if r['tokens_per_sec'] else '',
           f'dropped {r["train_fraction_dropped"]:.2%} train' if r['train_fraction_dropped']
           is not None else '',
           f'max logit {r["max_router_logit"]:.1f}' if r['max_router_logit'] is not None else '',
           f'{r["wall_time"] / 60:.1f} min',
           f'(copied from {result["copied_from"]})' if 'copied_from' in result else '']
  return ' '.join(p for p in parts if p)


def check_configs(specs: list[RunSpec], results: dict, sweep_dir: str):
  """Each run already in `sweep_dir` (finished, or with a checkpoint) has its spec's config."""
  for spec in specs:
    workdir = run_dir(sweep_dir, spec)
    saved = os.path.join(workdir, 'config.json')
    if results[spec.key]:
      check_same_config(workdir, results[spec.key]['config'], plain_config(spec.config))
    elif os.path.exists(saved) and os.path.isdir(os.path.join(workdir, 'checkpoints')):
      with open(saved) as f:
        check_same_config(workdir, json.load(f), plain_config(spec.config))


def run_one(spec: RunSpec, workdir: str, sweep: Sweep, shared: dict, quiet: bool) -> dict | None:
  """The result of a run not yet finished: copied from a finished run with its config in
  `shared`, or trained (resumed); None when a signal stopped it."""
  source = shared.get(json.dumps(plain_config(spec.config), sort_keys=True))
  if source and not os.path.exists(workdir):
    return copy_run(spec, source, workdir)
  result = train_run(spec, workdir, sweep, quiet)
  jax.clear_caches()  # each run compiles its own steps: do not keep them all
  return result


def run_sweep(sweep: Sweep, specs: list[RunSpec], sweep_dir: str, quiet: bool = False,
              done: Collection[str] = (), on_result: Callable[[dict], None] | None = None
              ) -> bool:
  """Train every unfinished run of `specs`, in order, and evaluate the EVALS variants of each
  finished run that lacks them; `done`: keys of runs already finished elsewhere (committed
  results: skipped), `on_result`: called with each result as it is finished. True when all are
  finished; False when a signal stopped it."""
  from moejax.train.stopping import stop_requests
  specs = [spec for spec in specs if spec.key not in done]
  results = {spec.key: load_result(run_dir(sweep_dir, spec)) for spec in specs}
  check_configs(specs, results, sweep_dir)
  shared = {} if sweep.train else finished_runs(os.path.dirname(sweep_dir))
  progress = tqdm(total=len(specs) + len(done),
                  initial=len(done) + sum(r is not None for r in results.values()),
                  desc=f'sweep {sweep.name}', unit='run', dynamic_ncols=True)
  with stop_requests() as stop:  # between runs; loop.train takes the signals during one
    for spec in specs:
      workdir = run_dir(sweep_dir, spec)
      new = results[spec.key] is None
      if new:
        if stop.signal:
          break
        progress.set_postfix_str(spec.key)
        results[spec.key] = run_one(spec, workdir, sweep, shared, quiet)
        if results[spec.key] is None:
          break
        progress.update()
        progress.write(one_line(results[spec.key]))
      result = results[spec.key]
      if set(sweep.evals) - set(result['evals']):
        result['evals'] = evaluate_variants(spec, workdir, sweep.evals, result['evals'])
        _write_json(os.path.join(workdir, RESULT), result)
        new = True
      if new and on_result:
        on_result(result)
  progress.close()
  return all(result is not None for result in results.values())
