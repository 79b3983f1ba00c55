"""`moejax ablate`: a 2-run sweep end to end (train, SIGTERM, resume, skip, report), every sweep
file's run configs at both scales, Switch-Base's parameter count, and the numbers a run reports."""
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, SMOKE_CONFIG, apply_layer, init_layer, sigterm_once_logged
from moejax import MoeLayer, collect_routing_metrics
from moejax.ablate import (Claim, Panel, Scale, SweepError, judge, load_result, load_sweep, main,
                           read_rows, run_dir, run_record, run_specs, run_sweep, sweep_names)
from moejax.ablate import committed, page, stats
from moejax.ablate.command import committed_keys
from moejax.ablate.runner import abstract_params, nominal_vocab_size
from moejax.ablate.verdict import SweepNumbers, decide, family_size, reach_step
from moejax.ablate.records import LAST_TRAIN_STEPS, RECORD, flatten, max_vio
from moejax.ablate.report import add_relative, timed_rows, write_png
from moejax.ablate.sweep import BASE_SCALE, Sweep, with_overrides
from moejax.models import make_model
from moejax.train import default_config, loop
from moejax.train.config import check_config
from moejax.train.inputs import dummy_batch, model_inputs
from moejax.train.resume import load

LONG_RUN_STEPS = 200  # the run the test interrupts

SWEEP = '''"""Two runs of the smoke model: moejax ablate's end-to-end test."""
from moejax.ablate import Panel

BASE = {base!r}
RUNS = {{'e2': {{'model.num_experts': 2}},
        'e4': {{'model.num_experts': 4, 'train.num_steps': {steps}}}}}
SEEDS = (0,)
SCALE = {{'small': {{'model.model_dim': 32, 'model.ffn_dim': 64, 'train.batch_size': 8,
                    'train.num_steps': 6, 'train.warmup_steps': 2, 'eval.every_steps': 50,
                    'checkpoint.every_steps': 50, 'data.source': {source!r},
                    'data.data_dir': {data_dir!r}}}}}
PLOTS = (Panel(x='model.num_experts', y='final_nll'), Panel(curve=True, x='step', y='nll'))
'''


def _write_sweep(tmp_path) -> str:
  path = tmp_path / 'two_runs.py'
  path.write_text(SWEEP.format(base=os.path.join(REPO, SMOKE_CONFIG), steps=LONG_RUN_STEPS,
                               source=os.path.join(REPO, 'data', 'timemachine.txt'),
                               data_dir=str(tmp_path / 'tfds')))
  return str(path)


@pytest.mark.slow
def test_a_sweep_trains_stops_resumes_skips_and_reports(tmp_path, monkeypatch):
  path = _write_sweep(tmp_path)
  runs_dir, results_dir = tmp_path / 'runs', tmp_path / 'results'
  sweep = load_sweep(path)
  specs = run_specs(sweep)
  sweep_dir = str(runs_dir / 'two_runs')
  short, long = (run_dir(sweep_dir, spec) for spec in specs)

  # SIGTERM during the second run: the first is finished, the second saved where it stopped.
  code = 'import sys; from moejax.ablate import main; sys.exit(main(sys.argv[1:]))'
  rc, out, err = sigterm_once_logged(
      [sys.executable, '-c', code, path, '--runs_dir', str(runs_dir), '--results_dir',
       str(results_dir), '--quiet'], os.path.join(long, 'metrics.jsonl'))
  assert rc == 0, err[-3000:]
  assert 'Run the same command again to resume' in out
  # The finished run is committed as soon as it finished.
  assert [r['run'] for r in committed.read_csv(str(results_dir / 'two_runs.csv'))] == ['e2']
  assert load_result(short)['record']['steps'] == 6 and load_result(long) is None
  stopped_at = max(int(s) for s in os.listdir(os.path.join(long, 'checkpoints')) if s.isdigit())
  assert 3 <= stopped_at < LONG_RUN_STEPS
  finished_at = os.path.getmtime(os.path.join(short, 'result.json'))

  # The same sweep again: the first run is skipped, the second resumes from its checkpoint (every
  # step logged once: a restart from scratch would log steps 1..stopped_at twice).
  assert run_sweep(sweep, specs, sweep_dir, quiet=True)
  assert os.path.getmtime(os.path.join(short, 'result.json')) == finished_at
  with open(os.path.join(long, 'metrics.jsonl')) as f:
    steps = [row['step'] for row in map(json.loads, f) if row['split'] == 'train']
  assert steps == list(range(1, LONG_RUN_STEPS + 1))
  record = load_result(long)['record']
  assert record['steps'] == LONG_RUN_STEPS and math.isfinite(record['final_nll'])
  assert record['max_router_logit'] > 0 and 0 <= record['train_fraction_dropped'] <= 1

  # Everything finished: nothing trains. A changed config is refused, naming the field. Another
  # sweep's run with the same config is copied.
  monkeypatch.setattr(loop, 'train', lambda *args, **kwargs: pytest.fail('trained again'))
  assert run_sweep(sweep, specs, sweep_dir, quiet=True)
  with pytest.raises(SweepError, match='train.learning_rate'):
    run_sweep(sweep, run_specs(sweep, overrides=[('train.learning_rate', '0.01')]), sweep_dir)
  other = tmp_path / 'other.py'
  other.write_text(open(path).read().replace("'e4': {", "'f4': {").replace("'e2'", "'same_as_e2'"))
  other = load_sweep(str(other))
  other_specs = [s for s in run_specs(other) if s.name == 'same_as_e2']
  assert run_sweep(other, other_specs, str(runs_dir / 'other'), quiet=True)
  copied_dir = run_dir(str(runs_dir / 'other'), other_specs[0])
  copied = load_result(copied_dir)
  assert copied['name'] == 'same_as_e2' and copied['copied_from'] == short
  assert copied['record'] == load_result(short)['record']
  run, state = load(other_specs[0].config, copied_dir)  # a whole run, checkpoints included
  run.checkpoints.close()
  assert int(state.step) == 6

  assert main([path, '--report', '--runs_dir', str(runs_dir),
               '--results_dir', str(results_dir)]) == 0
  with open(results_dir / 'two_runs.csv') as f:
    rows = list(csv.DictReader(f))
  assert [(r['run'], r['model.num_experts'], r['train.num_steps'], r['seed']) for r in rows] == [
      ('e2', '2', '6', '0'), ('e4', '4', str(LONG_RUN_STEPS), '0')]
  assert set(RECORD) <= set(rows[0])
  assert [r['config_hash'] for r in rows] == [committed.config_hash(s.config) for s in specs]
  curves = committed.read_numbers(str(results_dir), 'two_runs').curves
  assert sorted(curves) == [('e2', 0), ('e4', 0)] and curves['e4', 0][-1][0] == LONG_RUN_STEPS
  table = (results_dir / 'two_runs.md').read_text()
  assert '| e2 |' in table and '| e4 |' in table and 'two_runs.png' in table
  assert (results_dir / 'two_runs.png').stat().st_size > 10_000

  # Another sitting, the runs' directories gone: the committed runs are not trained again, and
  # the report is rebuilt from the committed files alone, the same.
  shutil.rmtree(runs_dir)
  assert main([path, '--runs_dir', str(tmp_path / 'new_runs'), '--results_dir',
               str(results_dir), '--quiet']) == 0
  assert (results_dir / 'two_runs.md').read_text() == table
  with pytest.raises(SweepError, match='holds e2/seed0 run with another config'):
    committed_keys(sweep, run_specs(sweep, overrides=[('train.learning_rate', '0.01')]),
                   str(results_dir), 'two_runs')


@pytest.mark.slow
def test_expert_dropout_pretrains_once_and_fine_tunes_on_a_few_passages(tmp_path, monkeypatch,
                                                                      tfds_dir):
  sweep = load_sweep('expert_dropout')
  tiny = {'STEPS': 4, 'EVAL_EVERY': 2, 'TRAIN_PASSAGES': 8, 'BATCH': 8}
  for name, value in tiny.items():
    monkeypatch.setitem(sweep.train.__globals__, name, value)
  overrides = [('model.num_layers', '2'), ('model.model_dim', '32'), ('model.ffn_dim', '64'),
               ('train.batch_size', '8'), ('train.num_steps', '3'), ('train.warmup_steps', '1'),
               ('eval.every_steps', '3'), ('eval.max_batches', '1'),
               ('data.data_dir', repr(str(tfds_dir)))]
  specs = [spec for spec in run_specs(sweep, overrides=overrides) if spec.seed == 0]
  sweep_dir = str(tmp_path / 'expert_dropout')
  assert run_sweep(sweep, specs, sweep_dir, quiet=True)
  assert sorted(os.listdir(sweep_dir)) == ['dropout0.1', 'dropout0.1_expert0.4', 'pretrain']
  for spec in specs:
    workdir = run_dir(sweep_dir, spec)
    record = load_result(workdir)['record']
    assert 0 <= record['test_balanced_accuracy'] <= 1 and math.isfinite(record['final_nll'])
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    evals = [r for r in rows if r['split'] == 'eval']
    assert [r['step'] for r in evals] == [2, 4]
    best = max(evals, key=lambda r: r['balanced_accuracy'])  # the first of ties
    assert record['stopping_step'] == best['step']  # early stopping: the test at that step
    assert record['validation_balanced_accuracy'] == best['balanced_accuracy']
    assert record['best_nll'] == min(r['nll'] for r in evals)
    assert [r['step'] for r in rows if r['split'] == 'train'] == [1, 2, 3, 4]

  few_passages = sweep.train.__globals__['few_passages']
  tokens, labels = np.arange(40).reshape(20, 2), np.repeat([0, 1], 10)
  chosen, chosen_labels = few_passages(tokens, labels, 3)
  assert np.bincount(chosen_labels).tolist() == [3, 3]
  assert (chosen[:, 0] // 2 < 10).tolist() == (chosen_labels == 0).tolist()  # rows kept whole
  np.testing.assert_array_equal(few_passages(tokens, labels, 3)[0], chosen)  # the same every run


@pytest.mark.parametrize('scale', ['small', 'base'])
def test_every_sweep_builds_checked_configs_without_training(scale):
  names = sweep_names()
  assert {'experts', 'speed_quality', 'capacity', 'eval_capacity', 'balance', 'init',
          'precision', 'z_loss', 'routing', 'expert_dropout'} <= set(names)
  for name in names:
    sweep = load_sweep(name)
    specs = run_specs(sweep, scale)  # each config checked by check_config
    assert len(specs) == sum(len(seeds) for seeds in sweep.seeds.values())
    for spec in specs:
      config = flatten(spec.config.to_dict())
      assert all(config[field] == value for field, value in spec.overrides.items()), spec.key
      assert config['seed'] == spec.seed
      if scale == 'base' and 'model.model_dim' not in spec.overrides:
        assert (config['model.model_dim'], config['model.num_layers']) == (768, 12)
    for panel in sweep.plots:
      assert panel.x in {'run', 'eval', 'step', 'seconds', *RECORD, *sweep.fields}, panel
    assert sweep.claims, name  # every sweep judges its paper's claims
    for claim in sweep.claims:
      for key in (claim.better, claim.than):
        run, _, variant = key.partition('@')
        assert run in sweep.runs and (not variant or variant in sweep.evals), (name, key)
      assert claim.min_pairs >= 8 and (claim.target is not None) == (
          claim.metric == 'time_to_target'), (name, claim.text)
      if claim.needs:  # "not testable here" names the scale that would test it, and why
        assert (claim.needs.params or claim.needs.steps) and claim.needs.why, claim.text
    # Its wall time here, once run (until then its claims read 'pending' on the page).
    assert re.search(r'Measured on the 2-core CPU: \d+ min|Not yet run \(\d+ runs', sweep.doc), name


@pytest.mark.slow
@pytest.mark.parametrize('scale', ['small', 'base'])
def test_every_scale_preset_initialises_every_run_with_abstract_shapes(scale):
  """Each run of each sweep at each --scale builds its model and initialises it with
  `jax.eval_shape` (no training, no vocabulary). At the small scale its parameters are those
  the committed runs counted."""
  traced = {}  # runs whose models are built from the same settings share one trace
  for name in sweep_names():
    sweep = load_sweep(name)
    counted = {row['run']: row['params'] for row in
               committed.read_csv(os.path.join(REPO, 'experiments', 'results', f'{name}.csv'))}
    # Each run's first seed (the other seeds' configs differ only in `seed`, and
    # test_every_sweep_builds_checked_configs_without_training checks them all).
    first_seeds = {run: seeds[:1] for run, seeds in sweep.seeds.items()}
    for spec in run_specs(dataclasses.replace(sweep, seeds=first_seeds), scale):
      vocab_size, config = nominal_vocab_size(spec.config), spec.config
      # Everything abstract_params reads: the model section, the task, the example lengths.
      key = (json.dumps(config.model.to_dict(), sort_keys=True, default=repr), config.task,
             config.data.length, config.data.noise_density, config.data.mean_span_length,
             vocab_size)
      if key not in traced:
        traced[key] = abstract_params(config, vocab_size)
      model_cfg, shapes = traced[key]
      params = _count(shapes)
      assert params > 0 and model_cfg.model_dim == spec.config.model.model_dim, spec.key
      if scale == 'small' and spec.name in counted:
        assert params == counted[spec.name], (name, spec.name)
      if scale == 'base':
        assert model_cfg.model_dim == 768 and model_cfg.vocab_size >= 32_000, spec.key


def test_the_committed_verdicts_are_rebuilt_from_the_committed_files_alone(tmp_path):
  """`moejax ablate all --report` with no runs at all, from a copy of the committed csv files
  only, writes every sweep's md as committed, and the page's table is the one in
  experiments/RESULTS.md."""
  committed_dir = os.path.join(REPO, 'experiments', 'results')
  results = tmp_path / 'results'
  results.mkdir()
  for name in os.listdir(committed_dir):
    if name.endswith('.csv'):
      shutil.copy(os.path.join(committed_dir, name), results)
  names = [n for n in sweep_names() if (results / f'{n}.csv').exists()]
  assert {'routing', 'balance'} <= set(names)
  assert main(['all', '--report', '--runs_dir', str(tmp_path / 'no_runs'),
               '--results_dir', str(results)]) == 0
  for name in names:
    with open(os.path.join(committed_dir, f'{name}.md')) as f:
      assert (results / f'{name}.md').read_text() == f.read(), name
  table = (results / 'verdicts.md').read_text()
  assert table == page.results_block(os.path.join(REPO, 'experiments', 'RESULTS.md'))
  with open(os.path.join(committed_dir, 'verdicts.md')) as f:
    assert table == f.read()
  assert not (tmp_path / 'no_runs').exists()


def test_a_bad_sweep_or_override_is_one_line_before_anything_runs(tmp_path, capsys):
  runs = ['--runs_dir', str(tmp_path / 'runs')]
  assert main(['no_such_sweep', *runs]) == 2
  assert "no sweep 'no_such_sweep'" in capsys.readouterr().err
  assert main(['capacity', '--config.model.num_expert=3', *runs]) == 2
  assert capsys.readouterr().err.startswith("moejax ablate: model.num_expert='3' is invalid")
  assert not (tmp_path / 'runs').exists()


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('dense, paper', [(True, 223e6), (False, 7.4e9)])
def test_base_scale_parameter_counts_match_the_papers(dense, paper):
  """T5-Base (223M, dense) and Switch-Base with 128 experts (7.4B), built from --scale base's
  shapes with `jax.eval_shape`. T5 v1.0 ties its output layer to the embedding; moejax's
  encoder-decoder has its own [D, V] 'logits' kernel (24.7M more), counted once here as T5 does."""
  config = with_overrides(default_config(), {**BASE_SCALE, 'model.dense_baseline': dense})
  model_config = dataclasses.replace(check_config(config), vocab_size=32_128)
  inputs = model_inputs(model_config, dummy_batch(model_config, 1, 8, 8))
  model = make_model(model_config)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, True))['params']
  untied = _count(params['logits'])
  assert untied == 768 * 32_128
  tied = _count(params) - untied
  assert abs(tied / paper - 1) < 0.05, (tied, paper)


def test_a_runs_numbers_from_its_metrics_rows(tmp_path):
  usage = 'expert_usage/decoder/unit_0/block_1'
  train = [{'step': s, 'split': 'train', 'tokens_per_sec': 1000.0 / t, 'fraction_dropped': d,
            'router_max_logit': m, 'nonfinite_total': n}
           for s, t, d, m, n in [(1, 9.0, 0.5, 1.0, 0), (2, 2.0, 0.25, 7.0, 1),
                                 (3, 1.0, 0.0, 3.0, 1),
                                 (3, 3.0, 0.75, 2.0, 1)]]  # step 3 again: a resumed run's row
  evals = [{'step': 2, 'split': 'eval', 'nll': 2.0, usage: [0.5, 0.5]},
           {'step': 3, 'split': 'eval', 'nll': 2.5, usage: [0.75, 0.25], 'fraction_dropped': 0.1}]
  rows = sorted(train + evals, key=lambda r: r['step'])
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
  record = run_record(read_rows(str(tmp_path)), tokens_per_step=1000)
  assert record['final_nll'] == 2.5 and record['best_nll'] == 2.0 and record['early_step'] == 2
  assert record['train_fraction_dropped'] == pytest.approx((0.5 + 0.25 + 0.75) / 3)
  assert record['eval_fraction_dropped'] == 0.1
  assert record['usage_cv'] == pytest.approx(0.25 / 0.5)  # std / mean of [0.75, 0.25]
  assert record['max_router_logit'] == 7.0 and record['nonfinite_steps'] == 1
  assert record['step_time'] == 3.0  # the median of 9, 2, 3 seconds (step 3's last row)
  assert record['tokens_per_sec'] == pytest.approx(1000 / 3) and record['steps'] == 3


def test_max_vio_is_the_largest_load_over_the_mean_minus_one_over_the_last_train_steps(tmp_path):
  a, b = 'expert_usage/decoder/unit_0/block_1', 'expert_usage/decoder/unit_1/block_1'
  # Layer a: max 0.5 / mean 0.25 - 1 = 1; layer b balanced: 0. Step mean 0.5.
  step = {a: [0.5, 0.25, 0.25, 0.0], b: [0.25] * 4}
  # Layer a: 0.4 / 0.25 - 1 = 0.6; layer b: 0.7 / 0.25 - 1 = 1.8. Step mean 1.2.
  later = {a: [0.4, 0.2, 0.2, 0.2], b: [0.7, 0.1, 0.1, 0.1]}
  # One expert takes all (E - 1 = 3): before the last 50 logged steps, so not counted.
  collapsed = {a: [1.0, 0.0, 0.0, 0.0], b: [1.0, 0.0, 0.0, 0.0]}
  usages = [collapsed] + [step, later] * (LAST_TRAIN_STEPS // 2)
  rows = [{'step': s, 'split': 'train', 'nonfinite_total': 0, **usage}
          for s, usage in enumerate(usages, start=1)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
  assert max_vio(collapsed) == pytest.approx(3.0)
  record = run_record(read_rows(str(tmp_path)), tokens_per_step=1000)
  assert record['max_vio'] == pytest.approx((0.5 + 1.2) / 2)
  assert max_vio({'fraction_dropped': 0.1}) is None


def test_relative_columns_pair_each_row_with_its_reference():
  cf, k = 'model.train_capacity_factor', 'model.num_selected_experts'
  panel = Panel(x=cf, y='step_time', series=k, relative_to={cf: 1.0}, relative='ratio')
  sweep = Sweep(name='s', path='', doc='', base='', runs={'a': {cf: 1.0, k: 1}},
                seeds={'a': (0,)}, plots=(panel,))
  rows = [{'run': f'top{kk}_cf{c}', cf: c, k: kk, 'seed': seed, 'step_time': c * kk + seed}
          for c in (1.0, 2.0) for kk in (1, 2) for seed in (0, 1)]
  rows = add_relative(sweep, rows)
  assert [r[panel.column] for r in rows if r[cf] == 2.0] == [2 / 1, 3 / 2, 4 / 2, 5 / 3]
  assert all(r[panel.column] == 1.0 for r in rows if r[cf] == 1.0)


def test_step_time_plots_use_the_round_robin_rounds_paired_by_round(tmp_path):
  cf = 'model.train_capacity_factor'
  panel = Panel(x=cf, y='step_time', relative_to={cf: 1.0}, relative='ratio')
  curves = Panel(curve=True, x='seconds', y='nll')
  sweep = Sweep(name='s', path='', doc='', base='', runs={'a': {cf: 1.0}, 'b': {cf: 2.0}},
                seeds={'a': (0,), 'b': (0,)}, plots=(panel, curves))
  rows = [{'run': 'a', cf: 1.0, 'seed': 0, 'step_time': 9.0},
          {'run': 'b', cf: 2.0, 'seed': 0, 'step_time': 1.0}]  # drifted sequential times
  numbers = SweepNumbers(rows, curves={('a', 0): [(1, 3.0), (2, 2.0)], ('b', 0): [(1, 2.5)]},
                         step_times={'a': {0: 1.0, 1: 2.0}, 'b': {0: 1.5, 1: 2.2}})
  timed = timed_rows(sweep, rows, numbers)
  assert [(r['run'], r['seed'], r['step_time']) for r in timed] == [
      ('a', 0, 1.0), ('a', 1, 2.0), ('b', 0, 1.5), ('b', 1, 2.2)]
  assert [r[panel.column] for r in timed if r['run'] == 'b'] == [1.5, 1.1]
  write_png(str(tmp_path / 's.png'), sweep, rows, numbers)  # curves at round-robin seconds
  assert (tmp_path / 's.png').stat().st_size > 10_000


def _rows(a, b, metric='final_nll', **extra):
  return [{'run': run, 'seed': seed, metric: value, **extra}
          for run, values in (('a', a), ('b', b)) for seed, value in enumerate(values)]


def _decided(claim, numbers):
  return decide([judge(claim, numbers)])[0]


def test_a_claims_verdict_follows_the_t_test_and_tost_rule():
  lower = Claim('a beats b', 'final_nll', 'a', 'b')
  # per-seed differences b - a: 0.1, 0.2, ..., 0.8: mean 0.45
  better, than = [1.0] * 8, [1.0 + i / 10 for i in range(1, 9)]
  held = _decided(lower, SweepNumbers(_rows(better, than)))
  test = stats.paired_t_test([i / 10 for i in range(1, 9)])
  assert held.difference == pytest.approx(0.45) and held.pairs == 8
  assert held.ci == pytest.approx((test.ci_low, test.ci_high)) and held.p == test.p_two_sided
  assert held.p_adjusted == held.p and held.verdict == 'reproduced'
  assert _decided(lower, SweepNumbers(_rows(than, better))).verdict == 'contradicted'
  higher = dataclasses.replace(lower, higher=True)
  assert _decided(higher, SweepNumbers(_rows(better, than))).verdict == 'contradicted'
  noisy = [1.0 + (0.3 if i % 2 else -0.29) for i in range(8)]  # mean 0.005, large spread
  assert _decided(lower, SweepNumbers(_rows(better, noisy))).verdict == 'inconclusive'
  # "Costs nothing" needs evidence (non-inferiority within the margin): a tight difference
  # inside the margin is equivalent (TOST too), one a little better than the margin is
  # reproduced (no worse), a noisy one with the same mean is neither, and one wholly beyond
  # the margin contradicts the claim.
  costs_nothing = dataclasses.replace(lower, margin=0.05)
  tight = [1.0 + 0.002 * (i % 3) for i in range(8)]
  equivalent = _decided(costs_nothing, SweepNumbers(_rows(better, tight)))
  d = [0.002 * (i % 3) for i in range(8)]
  assert equivalent.p == pytest.approx(stats.paired_t_test([x + 0.05 for x in d]).p_greater)
  assert equivalent.p_tost == pytest.approx(stats.tost(d, 0.05))
  assert equivalent.verdict == 'equivalent'
  a_bit_better = [1.04 + 0.01 * (i % 3) for i in range(8)]  # d 0.04-0.06: beyond +0.05 at times
  assert _decided(costs_nothing, SweepNumbers(_rows(better, a_bit_better))).verdict == 'reproduced'
  assert _decided(costs_nothing, SweepNumbers(_rows(better, noisy))).verdict == 'inconclusive'
  worse = [0.8 + 0.01 * (i % 3) for i in range(8)]  # a costs 0.19 more than b
  assert _decided(costs_nothing, SweepNumbers(_rows(better, worse))).verdict == 'contradicted'
  # better by more than the margin: it costs nothing either
  assert _decided(costs_nothing, SweepNumbers(_rows(better, than))).verdict == 'reproduced'
  # a diverged run's pair is left out, and counted
  diverged = _decided(lower, SweepNumbers(_rows(better + [float('nan')], than + [1.0])))
  assert (diverged.pairs, diverged.left_out, diverged.verdict) == (8, 1, 'reproduced')
  # Too few seeds: pending, whatever the numbers; too small runs: not testable, by the rule.
  three = _decided(lower, SweepNumbers(_rows(better[:3], than[:3])))
  assert (three.verdict, three.pairs, three.p_adjusted) == ('pending', 3, None)
  big = dataclasses.replace(lower, needs=Scale(params=1000, why='the paper\'s'))
  small = _decided(big, SweepNumbers(_rows(better, than, params=999)))
  assert small.verdict == 'not testable here' and small.difference == pytest.approx(0.45)
  assert _decided(big, SweepNumbers(_rows(better, than, params=1000))).verdict == 'reproduced'


def test_holm_corrects_over_the_distinct_comparisons_of_a_page():
  lower = Claim('a beats b', 'final_nll', 'a', 'b')
  # differences with a one-sample p of about 0.02 each
  than = [1.0 + d for d in (0.1, 0.05, 0.12, -0.02, 0.08, 0.03, 0.0, 0.06)]
  p = stats.paired_t_test([d - 1.0 for d in than]).p_two_sided
  assert 0.01 < p < 0.025
  same = SweepNumbers(_rows([1.0] * 8, than))
  other = SweepNumbers(_rows([1.5] * 8, [t + 0.5 for t in than]))  # other runs, the same p
  # The same comparison (the same runs' numbers) in two sweeps counts once: alone, reproduced.
  twice = decide([judge(lower, same), judge(lower, same)])
  assert [j.p_adjusted for j in twice] == [p, p] and family_size(twice) == 1
  assert {j.verdict for j in twice} == {'reproduced'}
  # Three distinct comparisons: 3p > 0.05, so none survives.
  three = decide([judge(lower, same), judge(lower, other),
                  judge(dataclasses.replace(lower, metric='early_nll'),
                        SweepNumbers(_rows([1.0] * 8, than, 'early_nll')))])
  assert [j.p_adjusted for j in three] == pytest.approx([3 * p] * 3)
  assert {j.verdict for j in three} == {'inconclusive'} and family_size(three) == 3
  # Pending and not-testable claims are outside the family.
  pending = judge(lower, SweepNumbers(_rows([2.0] * 3, than[:3])))
  assert decide([judge(lower, same), pending])[0].p_adjusted == p


def test_time_claims_read_the_curves_at_round_robin_step_times():
  # a: 2 s a step, b: 1 s a step; curves every 10 steps.
  curves = {('a', seed): [(10, 3.0), (20, 2.0), (30, 1.0 - seed / 100)] for seed in range(8)}
  curves |= {('b', seed): [(10, 2.9), (20, 2.5), (30, 2.4), (40, 1.5), (50, 1.4)]
             for seed in range(8)}
  numbers = SweepNumbers([], curves, {'a': {0: 2.0, 1: 2.1, 2: 1.9, 5: 9.0},
                                       'b': {0: 1.0, 1: 1.0, 2: 1.0}})
  assert reach_step([(10, 3.0), (20, 2.0)], 2.5) == 15.0  # halfway, linearly
  assert reach_step([(10, 3.0), (20, 2.0)], 1.0) is None
  sooner = judge(Claim('a gets there sooner', 'time_to_target', 'a', 'b', target=2.5), numbers)
  # a reaches 2.5 at step 15 = 30 s at its median 2.05 s a step; b at step 20 = 20 s.
  assert (sooner.better, sooner.than, sooner.difference) == pytest.approx((30.75, 20.0, -10.75))
  never = judge(Claim('a gets there sooner', 'time_to_target', 'a', 'b', target=1.2), numbers)
  assert (never.pairs, never.left_out) == (0, 8)  # a gets to 1.2, b never does: left out
  equal = judge(Claim('a ahead at equal time', 'nll_at_equal_time', 'a', 'b'), numbers)
  # a's curve ends at 61.5 s, b's at 50 s: a read at 50 s (step 50 / 2.05), b at its end.
  assert equal.than == pytest.approx(1.4)
  step = 50 / 2.05
  assert equal.better == pytest.approx(np.mean([2.0 - (step - 20) / 10 * (1.0 + s / 100)
                                                for s in range(8)]))
  rounds = judge(Claim('a steps faster', 'step_time', 'a', 'b'), numbers)  # by round
  assert rounds.pairs == 3 and rounds.difference == pytest.approx(-1.0)
  assert rounds.status == 'pending'  # 3 rounds of the 20 a step-time verdict needs


def test_router_max_logit_is_the_largest_logit_of_a_real_token():
  layer = MoeLayer(num_experts=4, ffn_dim=8, dispatch='einsum')
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  mask = jnp.ones((2, 6), bool).at[1, -2:].set(False)
  variables = jax.jit(lambda x: init_layer(layer, x))(x)
  sown = jax.jit(lambda x: apply_layer(layer, variables, x, padding_mask=mask)[1][
      'intermediates']['router_max_logit'][0])
  logits = x @ variables['params']['router']['dense']['kernel']  # Shape: [B, L, E]
  np.testing.assert_allclose(sown(x), jnp.abs(logits)[mask].max(), rtol=1e-5)
  garbage = jnp.where(mask[..., None], x, 1e3)  # padding changes nothing
  np.testing.assert_allclose(sown(garbage), sown(x))
  # Over layers it is the max (the other metrics the mean).
  sown = {f'layer{i}': {'fraction_dropped': (f,), 'expert_usage': (jnp.full(4, 0.25),),
                        'router_confidence': (0.5,), 'router_max_logit': (m,)}
          for i, (f, m) in enumerate([(0.1, 2.0), (0.3, 5.0)])}
  metrics = collect_routing_metrics(sown)
  assert metrics['router_max_logit'] == 5.0
  np.testing.assert_allclose(metrics['fraction_dropped'], 0.2)
