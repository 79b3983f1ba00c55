"""A sweep's report: its committed files (`moejax.ablate.committed`: <name>.csv, one row per run
and seed and EVALS variant, and <name>_curves.csv) updated with the finished runs, then <name>.md
(mean +- std over seeds, and the claims' verdicts) and <name>.png (the sweep's PLOTS, matplotlib)
rebuilt from those files alone."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np

from moejax.ablate import committed, page, stats
from moejax.ablate.records import RECORD, flatten
from moejax.ablate.sweep import Panel, RunSpec, Sweep
from moejax.ablate.verdict import Judgement, SweepNumbers

# Columns of the md table when a sweep names no TABLE (then the panels' relative columns and any
# numbers a TRAIN function adds).
TABLE = ('final_nll', 'best_nll', 'train_fraction_dropped', 'eval_fraction_dropped', 'usage_cv',
         'max_router_logit', 'nonfinite_steps', 'diverged', 'step_time', 'tokens_per_sec',
         'params')
LABELS = {
    'final_nll': 'final validation NLL (nats/token)',
    'best_nll': 'best validation NLL (nats/token)',
    'early_nll': 'first validation NLL (nats/token)', 'nll': 'validation NLL (nats/token)',
    'train_fraction_dropped': 'token choices dropped, train (fraction)',
    'eval_fraction_dropped': 'token choices dropped, eval (fraction)',
    'usage_cv': 'expert usage std / mean (final eval)', 'max_router_logit': 'max |router logit|',
    'nonfinite_steps': 'non-finite steps skipped', 'diverged': 'diverged runs',
    'step_time': 'median train step time (s)', 'tokens_per_sec': 'train tokens / s',
    'wall_time': 'wall time (s)', 'params': 'parameters', 'mflops_per_token': 'MFLOP / token',
    'step': 'train step', 'seconds': 'training time (s, steps x median step time)',
    'run': 'run', 'eval': 'evaluated as'}


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def result_rows(sweep: Sweep, results: list[dict], hashes: dict) -> list[dict]:
  """One row per finished run and seed (per EVALS variant, when the sweep has them): 'run',
  ['eval'], every overridden field's value, 'seed', the record's numbers and the config's hash
  (`hashes[run, seed]`)."""
  rows = []
  for result in results:
    config = flatten(result['config'])
    base = {'run': result['name']}
    fields = {field: config.get(field) for field in sweep.fields}
    tail = {'config_hash': hashes[result['name'], result['seed']]}
    if not sweep.evals:
      rows.append({**base, **fields, 'seed': result['seed'], **result['record'], **tail})
      continue
    for name, overrides in sweep.evals.items():
      if name in result['evals']:
        rows.append({**base, 'eval': name, **fields, **overrides, 'seed': result['seed'],
                     **result['record'], **result['evals'][name], **tail})
  return rows


def _merged(old: list[dict], new: list[dict], keep: set, key: Callable) -> list[dict]:
  """The committed rows of runs still in the sweep (`keep`: (run, seed, hash)) and not among
  the new ones, then the new ones, in the order of `key`."""
  fresh = {(row['run'], row['seed']) for row in new}
  kept = [row for row in old if (row['run'], row['seed'], row.get('config_hash')) in keep
          and (row['run'], row['seed']) not in fresh]
  return sorted(kept + new, key=key)


def update_committed(sweep: Sweep, specs: list[RunSpec], results: list[dict], stem: str):
  """Merge the finished runs' rows and curves into the committed <stem>.csv and
  <stem>_curves.csv (kept: the committed runs of `specs` with the same config hash)."""
  hashes = {(s.name, s.seed): committed.config_hash(s.config) for s in specs}
  order = {key: i for i, key in enumerate(hashes)}
  evals = list(sweep.evals)
  files = committed.paths(os.path.dirname(stem), os.path.basename(stem))
  keep = {(run, seed, h) for (run, seed), h in hashes.items()}
  rows = _merged(committed.read_csv(files['rows']), result_rows(sweep, results, hashes), keep,
                 lambda r: (order.get((r['run'], r['seed']), len(order)),
                            evals.index(r['eval']) if r.get('eval') in evals else 0))
  if rows:
    committed.write_csv(files['rows'], rows)
  elif os.path.exists(files['rows']):  # none of its runs is in the sweep any more
    os.remove(files['rows'])
  fresh = committed.curve_rows(results)
  redone = {(r['run'], r['seed']) for r in fresh}
  kept = {(r['run'], r['seed']) for r in rows} - redone
  old = [r for r in committed.read_csv(files['curves']) if (r['run'], r['seed']) in kept]
  curves = sorted(old + fresh, key=lambda r: (order.get((r['run'], r['seed']), len(order)),
                                               r['step']))
  if curves:
    committed.write_csv(files['curves'], curves, committed.CURVE_COLUMNS)


def add_relative(sweep: Sweep, rows: list[dict]) -> list[dict]:
  """Each row with every panel's relative column (`Panel.relative_to`): its `y` over (or minus)
  that of the row with the reference field values, the same seed and the same other fields."""
  others = lambda row, panel: tuple(
      (f, repr(row.get(f))) for f in (*sweep.fields, 'seed') if f not in panel.relative_to)
  for panel in sweep.plots:
    if not panel.relative_to or panel.curve:
      continue
    refs = {others(row, panel): row.get(panel.y) for row in rows
            if all(row.get(f) == v for f, v in panel.relative_to.items())}
    for row in rows:
      ref, value = refs.get(others(row, panel)), row.get(panel.y)
      if ref is None or value is None:
        row[panel.column] = None
      else:
        row[panel.column] = value / ref if panel.relative == 'ratio' else value - ref
  return rows


def _groups(rows: list[dict], key: Callable) -> dict:
  groups = {}
  for row in rows:
    groups.setdefault(key(row), []).append(row)
  return groups


def _cell(name: str, values: list) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return ''
  if name == 'diverged':
    return f'{sum(values)}/{len(values)}'
  if name == 'nonfinite_steps':  # per seed: how unstable each run was
    return ', '.join(map(str, values))
  if len(values) == 1 or not all(_number(v) for v in values):
    return page.fmt(name, values[0])
  mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
  return f'{page.fmt(name, mean)} ± {page.fmt(name, std)}'


def markdown(sweep: Sweep, rows: list[dict], decided: list[Judgement], scale: str, total: int,
             stem: str, step_times: Mapping[str, Mapping[int, float]]) -> str:
  """The md report: what was run, one table row per run (and EVALS variant), then the verdict
  of each of the sweep's CLAIMS (`decided`: judged with the whole page). A run's step_time cell
  is its round-robin median where `step_times` (run -> round -> seconds) has it."""
  finished = len({(row['run'], row['seed']) for row in rows})
  seeds = sorted({seed for run_seeds in sweep.seeds.values() for seed in run_seeds})
  claim = sweep.doc.strip().split('\n\n')[0]
  relative = [p.column for p in sweep.plots if p.relative_to and not p.curve]
  columns = [*(sweep.table or TABLE), *relative]
  known = {'run', 'eval', 'seed', 'config_hash', *sweep.fields, *RECORD, *columns}
  columns += list(dict.fromkeys(k for row in rows for k in row if k not in known))
  header = ['run', *(['eval'] if sweep.evals else []), *sweep.fields, 'seeds', *columns]
  lines = [f'# Sweep `{sweep.name}` ({scale} scale)', '', claim, '',
           f'{finished} of {total} runs finished (seeds {", ".join(map(str, seeds))}); '
           f'`moejax ablate {sweep.name} --report` rebuilds this from `{stem}.csv` and '
           f'`{stem}_curves.csv` (and `{stem}_step_times.csv`). Mean ± sample std over seeds; '
           'NLL in validation nats/token (a byte here); definitions in '
           '`moejax/ablate/records.py`. The step_time column is the median over the '
           'rounds of the round-robin timing (`benchmarks/sweep_step_time.py`) for the runs '
           'so timed, else each run\'s own median (runs trained one after another: it '
           'carries the machine\'s drift); step-time verdicts rest on the round-robin times.',
           '', f'![{sweep.name}]({stem}.png)',
           '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for (run, variant), group in _groups(rows, lambda r: (r['run'], r.get('eval'))).items():
    rounds = list(step_times.get(run, {}).values())
    cells = [run, *([variant] if sweep.evals else []),
             *(str(group[0].get(f)) for f in sweep.fields), str(len(group)),
             *(f'{page.fmt(c, float(np.median(rounds)))} ({len(rounds)} rounds)'
               if c == 'step_time' and rounds else _cell(c, [r.get(c) for r in group])
               for c in columns)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  if decided:
    lines += ['', '## Verdicts', '',
              'Paired by seed (step times: by round); difference = how far the claim\'s '
              'direction holds (positive: as the paper says) with its 95% interval; p of the '
              'two-sided paired t-test (with a margin: of not being worse by more than it), '
              'Holm-adjusted over the whole page (experiments/RESULTS.md). Rule: '
              '`moejax/ablate/verdict.py`.', '',
              *page.table_lines([(sweep.name, j) for j in decided], with_sweep=False)]
  return '\n'.join(lines) + '\n'


def _label(panel: Panel, name: str) -> str:
  label = LABELS.get(name, name)
  if name == panel.column and panel.relative_to:
    ref = ', '.join(f'{f.rsplit(".", 1)[-1]} = {v}' for f, v in panel.relative_to.items())
    if panel.relative == 'ratio':
      label = f'{label.split(" (")[0]} relative to {ref} (ratio)'
    else:
      label = f'{LABELS.get(panel.y, panel.y)}\nminus that at {ref}'
  return label


def _draw_points(ax, panel: Panel, rows: list[dict]):
  """Mean over seeds of the panel's column, with its 95% interval, against x: points for
  categorical settings, lines for numeric ones (a log axis when they span decades); the papers'
  numbers dashed."""
  xs = list(dict.fromkeys(row.get(panel.x) for row in rows))
  categorical = not all(_number(x) for x in xs)
  position = xs.index if categorical else (lambda x: x)
  series = (lambda row: row.get(panel.series)) if panel.series else (lambda row: None)
  groups = _groups(rows, series)
  for i, (value, group) in enumerate(groups.items()):
    points = _groups(group, lambda row: row.get(panel.x))
    values = [[r[panel.column] for r in rs if r.get(panel.column) is not None]
              for rs in points.values()]
    shift = 0.08 * (i - (len(groups) - 1) / 2) if categorical else 0.0
    ax.errorbar([position(x) + shift for x in points],
                [np.mean(v) if v else np.nan for v in values],
                yerr=[stats.interval_half_width(v) for v in values], marker='o', capsize=3,
                linestyle='none' if categorical else '-',
                label=f'{panel.series.rsplit(".", 1)[-1]} = {value}' if panel.series else 'ours')
  for i, (label, points) in enumerate((panel.paper or {}).items()):
    points = [(position(x), y) for x, y in points if not categorical or x in xs]
    ax.plot(*zip(*points), color='k', linestyle=('--', ':', '-.')[i % 3], marker='x', alpha=0.6,
            label=label)
  positive = [x for x in xs if _number(x) and x > 0]
  if categorical:
    ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30, ha='right')
  elif panel.log_x or (positive and max(positive) / min(positive) >= 100):
    if len(positive) < len(xs):  # a zero among the decades
      ax.set_xscale('symlog', linthresh=min(positive))
    else:
      ax.set_xscale('log')


def _curve_seconds(numbers: SweepNumbers, run: str) -> float:
  """A run's step time for its curve's time axis: the round-robin median, else the median of
  its rows' step times."""
  times = list(numbers.step_times.get(run, {}).values()) or [
      r['step_time'] for r in numbers.rows if r['run'] == run and r.get('step_time')]
  return float(np.median(times)) if times else float('nan')


def _draw_curves(ax, panel: Panel, numbers: SweepNumbers):
  """Each run's validation curve, mean over seeds (95% interval shaded) at each evaluated step."""
  for run, keys in _groups(list(numbers.curves), lambda key: key[0]).items():
    by_step = _groups([point for key in keys for point in numbers.curves[key]], lambda p: p[0])
    scale = _curve_seconds(numbers, run) if panel.x == 'seconds' else 1.0
    x = [step * scale for step in by_step]
    y = [[nll for _, nll in points] for points in by_step.values()]
    mean = np.array([np.mean(v) for v in y])
    half = np.array([stats.interval_half_width(v) for v in y])
    ax.plot(x, mean, marker='.', label=run)
    ax.fill_between(x, mean - half, mean + half, alpha=0.2)


def timed_rows(sweep: Sweep, rows: list[dict], numbers: SweepNumbers) -> list[dict]:
  """One row per round of the round-robin step times of each run that has them (its fields from
  its first row; 'seed' the round, so relative columns pair by round)."""
  first = {}
  for row in rows:
    first.setdefault(row['run'], row)
  timed = [{**{f: first[run].get(f) for f in ('run', *sweep.fields)}, 'seed': i, 'step_time': t}
           for run, times in numbers.step_times.items() if run in first
           for i, t in times.items()]
  return add_relative(sweep, timed)


def write_png(path: str, sweep: Sweep, rows: list[dict], numbers: SweepNumbers):
  """The sweep's PLOTS side by side; their notes (the papers' claims) under them. Step times
  are the round-robin ones where the sweep has them."""
  plt = page.pyplot()
  panels = sweep.plots or (Panel(y='final_nll'),)
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    round_robin = panel.y == 'step_time' and bool(numbers.step_times)
    if panel.curve:
      _draw_curves(ax, panel, numbers)
    else:
      _draw_points(ax, panel, timed_rows(sweep, rows, numbers) if round_robin else rows)
    ax.set_xlabel(LABELS.get(panel.x, panel.x))
    ax.set_ylabel(panel.ylabel or _label(panel, panel.y if panel.curve else panel.column))
    title = panel.title or f'{sweep.name}: {panel.y} vs {panel.x}'
    ax.set_title(title + (' (round-robin)' if round_robin else ''), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  notes = [f'{panel.title or panel.y}: {panel.note}' for panel in panels if panel.note]
  lines = sum(note.count('\n') + 1 for note in notes)
  fig.tight_layout(rect=(0, min(0.03 * lines, 0.3), 1, 1))
  fig.text(0.01, 0.01, '\n'.join(notes), fontsize=8, va='bottom')
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_reports(sweep: Sweep, specs: list[RunSpec], results: list[dict], results_dir: str,
                  scale: str, suffix: str = '', page_too: bool = True) -> list[str]:
  """Merge the finished runs' `results` into the sweep's committed files in `results_dir`
  (stem: the sweep's name + `suffix`, '_base' at the base scale), then rebuild from those files
  alone its .png, the .md of every sweep with committed runs (each carries the page's Holm p)
  and, with `page_too`, the page of verdicts (`moejax.ablate.page`); the paths written."""
  os.makedirs(results_dir, exist_ok=True)
  stem = sweep.name + suffix
  update_committed(sweep, specs, results, os.path.join(results_dir, stem))
  sweeps = page.page_sweeps(sweep, suffix)
  decided = page.named(sweeps, results_dir)
  written = [os.path.join(results_dir, stem + '.csv'),
             os.path.join(results_dir, stem + '_curves.csv')]
  for other, other_stem in sweeps:
    numbers = committed.read_numbers(results_dir, other_stem)
    if not numbers.rows:
      continue
    rows = add_relative(other, [dict(row) for row in numbers.rows])
    base = os.path.join(results_dir, other_stem)
    total = sum(len(seeds) for seeds in other.seeds.values())
    with open(base + '.md', 'w') as f:
      f.write(markdown(other, rows, [j for name, j in decided if name == other_stem], scale,
                       total, other_stem, numbers.step_times))
    written.append(base + '.md')
    if other is sweep:
      write_png(base + '.png', sweep, rows, numbers)
      written.append(base + '.png')
  return written + (page.write_page(decided, results_dir, suffix) if page_too else [])


def write_page(results_dir: str, suffix: str = '') -> list[str]:
  """The page of verdicts of every sweep, from the committed files in `results_dir`."""
  return page.write_page(page.named(page.page_sweeps(suffix=suffix), results_dir), results_dir,
                         suffix)
