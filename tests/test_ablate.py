"""`moejax ablate`: a 2-run sweep end to end (train, SIGTERM, resume, skip, report), every sweep
file's run configs at both scales, Switch-Base's parameter count, and the numbers a run reports."""
import csv
import dataclasses
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, SMOKE_CONFIG, apply_layer, init_layer, sigterm_once_logged
from moejax import MoeLayer, collect_routing_metrics
from moejax.ablate import (Claim, Panel, SweepError, judge, load_result, load_sweep, main,
                           read_rows, run_dir, run_record, run_specs, run_sweep, sweep_names)
from moejax.ablate.records import RECORD, flatten
from moejax.ablate.report import add_relative
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
  table = (results_dir / 'two_runs.md').read_text()
  assert '| e2 |' in table and '| e4 |' in table and 'two_runs.png' in table
  assert (results_dir / 'two_runs.png').stat().st_size > 10_000


@pytest.mark.slow
def test_expert_dropout_pretrains_once_and_fine_tunes_on_a_few_passages(tmp_path, monkeypatch,
                                                                      tfds_dir):
  sweep = load_sweep('expert_dropout')
  tiny = {'STEPS': 4, 'EVAL_EVERY': 2, 'TRAIN_PASSAGES': 8, 'BATCH': 8}
  for name, value in tiny.items():
    monkeypatch.setitem(sweep.train.__globals__, name, value)
  overrides = [('model.model_dim', '32'), ('model.ffn_dim', '64'), ('train.batch_size', '8'),
               ('train.num_steps', '3'), ('train.warmup_steps', '1'), ('eval.every_steps', '3'),
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
    assert [r['step'] for r in rows if r['split'] == 'eval'] == [2, 4]
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
    assert re.search(r'Measured on the 2-core CPU: \d+ min', sweep.doc), name


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


def test_a_claims_verdict_follows_the_two_standard_error_rule():
  rows = lambda a, b: [{'run': run, 'seed': seed, 'final_nll': value}
                       for run, values in (('a', a), ('b', b)) for seed, value in enumerate(values)]
  lower = Claim('a beats b', 'final_nll', 'a', 'b')
  # per-seed differences b - a: 0.1, 0.2, 0.3: mean 0.2, SE 0.1 / sqrt(3) = 0.0577
  held = judge(lower, rows([1.0, 1.0, 1.0], [1.1, 1.2, 1.3]), [])
  assert held['difference'] == pytest.approx(0.2) and held['se'] == pytest.approx(0.1 / 3**0.5)
  assert (held['seeds'], held['verdict']) == (3, 'reproduced')
  assert judge(lower, rows([1.1, 1.2, 1.3], [1.0, 1.0, 1.0]), [])['verdict'] == 'not reproduced'
  noisy = rows([1.0, 1.0, 1.0], [1.3, 0.8, 1.0])  # mean difference 0.033, SE 0.145
  assert judge(lower, noisy, [])['verdict'] == 'not shown'
  assert judge(dataclasses.replace(lower, no_worse=True), noisy, [])['verdict'] == 'reproduced'
  assert judge(lower, rows([1.0], [2.0]), [])['verdict'] == 'not shown'  # one seed: no SE
  higher = Claim('a scores more', 'final_nll', 'a', 'b', higher=True)
  assert judge(higher, rows([1.0, 1.0, 1.0], [1.1, 1.2, 1.3]), [])['verdict'] == 'not reproduced'
  # at equal time: a (2 s a step) and b (1.25 s a step) are read at b's end, 5 s: a halfway
  # between its steps 2 and 3
  curve = lambda step_time, nlls: [{'step': s, 'seconds': s * step_time, 'nll': n}
                                   for s, n in zip((1, 2, 3, 4), nlls)]
  results = [{'name': 'a', 'seed': seed, 'curve': curve(2.0, [3.0, 2.0 + seed / 10, 1.0, 0.5])}
             for seed in range(3)]
  results += [{'name': 'b', 'seed': seed, 'curve': curve(1.25, [2.6, 2.5, 2.4, 2.3])}
              for seed in range(3)]
  timed = judge(dataclasses.replace(lower, at_equal_time=True), [], results)
  assert timed['better'] == pytest.approx(1.55) and timed['than'] == pytest.approx(2.3)
  assert timed['difference'] == pytest.approx(0.75)
  assert timed['verdict'] == 'reproduced'


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
