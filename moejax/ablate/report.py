"""A sweep's report from its finished runs: <name>.csv (one row per run and seed, and EVALS
variant), <name>.md (mean +- std over seeds) and <name>.png (the sweep's PLOTS, matplotlib)."""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable

import numpy as np

from moejax.ablate.records import RECORD, flatten
from moejax.ablate.sweep import Panel, Sweep
from moejax.ablate.verdict import verdict_lines

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


def _fmt(name: str, value) -> str:
  if value is None:
    return ''
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if 'fraction' in name:
    return f'{100 * value:.2f}%'
  if name == 'step_time':
    return f'{1000 * value:.0f} ms'
  if name in ('tokens_per_sec', 'params', 'wall_time'):
    return f'{value:,.0f}'
  return f'{value:.4f}' if isinstance(value, float) else str(value)


def result_rows(sweep: Sweep, results: list[dict]) -> list[dict]:
  """One row per finished run and seed (per EVALS variant, when the sweep has them): 'run',
  ['eval'], every overridden field's value, 'seed', and the record's numbers."""
  rows = []
  for result in results:
    config = flatten(result['config'])
    base = {'run': result['name']}
    fields = {field: config.get(field) for field in sweep.fields}
    if not sweep.evals:
      rows.append({**base, **fields, 'seed': result['seed'], **result['record']})
      continue
    for name, overrides in sweep.evals.items():
      if name in result['evals']:
        rows.append({**base, 'eval': name, **fields, **overrides, 'seed': result['seed'],
                     **result['record'], **result['evals'][name]})
  return rows


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


def write_csv(path: str, rows: list[dict]):
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows({k: '' if v is None else v for k, v in row.items()} for row in rows)


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
    return _fmt(name, values[0])
  return f'{_fmt(name, float(np.mean(values)))} ± {_fmt(name, float(np.std(values, ddof=1)))}'


def markdown(sweep: Sweep, rows: list[dict], results: list[dict], scale: str, total: int,
             sweep_dir: str) -> str:
  """The md report: what was run, one table row per run (and EVALS variant), then the verdict
  of each of the sweep's CLAIMS."""
  finished = len({(row['run'], row['seed']) for row in rows})
  seeds = sorted({seed for run_seeds in sweep.seeds.values() for seed in run_seeds})
  claim = sweep.doc.strip().split('\n\n')[0]
  relative = [p.column for p in sweep.plots if p.relative_to and not p.curve]
  columns = [*(sweep.table or TABLE), *relative]
  known = {'run', 'eval', 'seed', *sweep.fields, *RECORD, *columns}
  columns += list(dict.fromkeys(k for row in rows for k in row if k not in known))
  header = ['run', *(['eval'] if sweep.evals else []), *sweep.fields, 'seeds', *columns]
  lines = [f'# Sweep `{sweep.name}` ({scale} scale)', '', claim, '',
           f'{finished} of {total} runs finished (seeds {", ".join(map(str, seeds))}), '
           f'from `{sweep_dir}`; `moejax ablate {sweep.name} --report` rebuilds this. Mean ± '
           'sample std over seeds; NLL in validation nats/token; definitions in '
           '`moejax/ablate/records.py`.', '', f'![{sweep.name}]({os.path.basename(sweep_dir)}.png)',
           '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for (run, variant), group in _groups(rows, lambda r: (r['run'], r.get('eval'))).items():
    cells = [run, *([variant] if sweep.evals else []),
             *(str(group[0].get(f)) for f in sweep.fields), str(len(group)),
             *(_cell(c, [r.get(c) for r in group]) for c in columns)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  verdicts = verdict_lines(sweep.claims, rows, results, _fmt)
  return '\n'.join(lines + ([''] + verdicts if verdicts else [])) + '\n'


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _label(panel: Panel, name: str) -> str:
  label = LABELS.get(name, name)
  if name == panel.column and panel.relative_to:
    ref = ', '.join(f'{f.rsplit(".", 1)[-1]} = {v}' for f, v in panel.relative_to.items())
    label = (f'{LABELS.get(panel.y, panel.y)}\n'
             f'{"relative to" if panel.relative == "ratio" else "minus that at"} {ref}')
  return label


def _draw_points(ax, panel: Panel, rows: list[dict]):
  """Mean +- std over seeds of the panel's column against x, a line per series, and the papers'
  numbers dashed."""
  xs = list(dict.fromkeys(row.get(panel.x) for row in rows))
  categorical = not all(_number(x) for x in xs)
  position = xs.index if categorical else (lambda x: x)
  series = (lambda row: row.get(panel.series)) if panel.series else (lambda row: None)
  for value, group in _groups(rows, series).items():
    points = _groups(group, lambda row: row.get(panel.x))
    values = [[r[panel.column] for r in rs if r.get(panel.column) is not None]
              for rs in points.values()]
    ax.errorbar([position(x) for x in points], [np.mean(v) if v else np.nan for v in values],
                yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values], marker='o',
                capsize=3,
                label=f'{panel.series.rsplit(".", 1)[-1]} = {value}' if panel.series else 'ours')
  for i, (label, points) in enumerate((panel.paper or {}).items()):
    points = [(position(x), y) for x, y in points if not categorical or x in xs]
    ax.plot(*zip(*points), color='k', linestyle=('--', ':', '-.')[i % 3], marker='x', alpha=0.6,
            label=label)
  if categorical:
    ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30, ha='right')
  elif panel.log_x:
    ax.set_xscale('log')


def _draw_curves(ax, panel: Panel, results: list[dict]):
  """Each run's validation curve, mean over seeds (+- std shaded) at each evaluated step."""
  for run, group in _groups(results, lambda r: r['name']).items():
    by_step = _groups([point for r in group for point in r['curve']], lambda p: p['step'])
    x = [np.mean([p[panel.x] for p in points]) for points in by_step.values()]
    y = [[p[panel.y] for p in points] for points in by_step.values()]
    mean = np.array([np.mean(v) for v in y])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in y])
    ax.plot(x, mean, marker='.', label=run)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2)


def write_png(path: str, sweep: Sweep, rows: list[dict], results: list[dict]):
  """The sweep's PLOTS side by side; their notes (the papers' claims) under them."""
  plt = _pyplot()
  panels = sweep.plots or (Panel(y='final_nll'),)
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    if panel.curve:
      _draw_curves(ax, panel, results)
    else:
      _draw_points(ax, panel, rows)
    ax.set_xlabel(LABELS.get(panel.x, panel.x))
    ax.set_ylabel(panel.ylabel or _label(panel, panel.y if panel.curve else panel.column))
    ax.set_title(panel.title or f'{sweep.name}: {panel.y} vs {panel.x}', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  notes = [f'{panel.title or panel.y}: {panel.note}' for panel in panels if panel.note]
  lines = sum(note.count('\n') + 1 for note in notes)
  fig.tight_layout(rect=(0, min(0.03 * lines, 0.3), 1, 1))
  fig.text(0.01, 0.01, '\n'.join(notes), fontsize=8, va='bottom')
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_reports(sweep: Sweep, results: list[dict], results_dir: str, scale: str, total: int,
                  sweep_dir: str) -> list[str]:
  """Write <name>.csv, .md and .png (named as the sweep's directory: '<name>_base' at the base
  scale) of the finished runs' results; returns their paths."""
  os.makedirs(results_dir, exist_ok=True)
  stem = os.path.join(results_dir, os.path.basename(sweep_dir))
  rows = add_relative(sweep, result_rows(sweep, results))
  relative = {p.column for p in sweep.plots if p.relative_to}
  write_csv(stem + '.csv', [{k: v for k, v in row.items() if k not in relative} for row in rows])
  with open(stem + '.md', 'w') as f:
    f.write(markdown(sweep, rows, results, scale, total, sweep_dir))
  write_png(stem + '.png', sweep, rows, results)
  return [stem + '.csv', stem + '.md', stem + '.png']
