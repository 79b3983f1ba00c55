"""The page of verdicts: every claim of every sweep judged on the committed numbers, Holm's
correction over all of them, a table and a forest plot.

  <results_dir>/verdicts.md    the table (also between the markers of experiments/RESULTS.md);
                               verdicts_base.md at --scale base
  <results_dir>/verdicts.png   each tested claim's difference with its 95% interval, relative to
                               the `than` run's mean, coloured by verdict
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

from moejax.ablate import committed
from moejax.ablate.sweep import Sweep, load_sweep, sweep_names
from moejax.ablate.verdict import (CONTRADICTED, EQUIVALENT, INCONCLUSIVE, NOT_TESTABLE, PENDING,
                                   REPRODUCED, Judgement, decide, family_size, judge)

BEGIN = '<!-- verdicts: `moejax ablate all --report` writes this table -->'
END = '<!-- /verdicts -->'
COLOURS = {REPRODUCED: 'tab:green', EQUIVALENT: 'tab:blue', CONTRADICTED: 'tab:red',
           INCONCLUSIVE: 'tab:gray'}
UNITS = {'final_nll': 'nats/byte', 'early_nll': 'nats/byte', 'nll_at_equal_time': 'nats/byte',
         'best_nll': 'nats/byte', 'step_time': 'ms', 'time_to_target': 's',
         'train_fraction_dropped': '% of choices', 'eval_fraction_dropped': '% of choices'}


def fmt(name: str, value) -> str:
  """A number of metric `name` as the tables write it."""
  if value is None:
    return ''
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if 'fraction' in name or name.endswith('accuracy'):
    return f'{100 * value:.2f}%'
  if name == 'step_time':
    return f'{1000 * value:.1f} ms'
  if name == 'time_to_target':
    return f'{value:.2f} s'
  if name in ('tokens_per_sec', 'params', 'wall_time'):
    return f'{value:,.0f}'
  return f'{value:.4f}' if isinstance(value, float) else str(value)


def judgements(sweeps: Sequence[tuple[Sweep, str]], results_dir: str) -> list[Judgement]:
  """Every claim of the (sweep, file stem) pairs judged on its committed numbers, then decided
  together: Holm over the page."""
  found = []
  for sweep, stem in sweeps:
    numbers = committed.read_numbers(results_dir, stem)
    found += [judge(claim, numbers) for claim in sweep.claims]
  return decide(found)


def page_sweeps(extra: Sweep | None = None, suffix: str = '') -> list[tuple[Sweep, str]]:
  """The repository's sweeps, and `extra` (a sweep loaded elsewhere), with their file stems."""
  sweeps = [load_sweep(name) for name in sweep_names()]
  if extra is not None:  # in place of the file of its name
    names = [s.name for s in sweeps]
    if extra.name in names:
      sweeps[names.index(extra.name)] = extra
    else:
      sweeps.append(extra)
  return [(sweep, sweep.name + suffix) for sweep in sweeps]


def _difference(j: Judgement) -> str:
  metric = j.claim.metric
  if j.difference is None:
    return ''
  interval = (f' [{fmt(metric, j.ci[0])}, {fmt(metric, j.ci[1])}]' if j.ci else '')
  return f'{fmt(metric, j.difference)}{interval}'


def _verdict_cell(j: Judgement) -> str:
  if j.verdict == NOT_TESTABLE:
    return f'not testable here: needs {j.claim.needs.describe()}'
  if j.verdict == PENDING:
    return f'pending ({j.pairs} of {j.claim.min_pairs})'
  return f'**{j.verdict}**'


def _p(value: float | None) -> str:
  if value is None:
    return ''
  if value == 0:
    return '0'
  return f'{value:.3f}' if value >= 0.001 else f'{value:.0e}'


def claim_cell(j: Judgement) -> str:
  claim = j.claim
  extras = [f'margin ±{fmt(claim.metric, claim.margin)}' if claim.margin else '',
            f'target {claim.target:g} nats/byte' if claim.target is not None else '',
            f'added after seeing results: {claim.post_hoc}' if claim.post_hoc else '']
  extras = '; '.join(e for e in extras if e)
  return claim.text + (f' ({extras})' if extras else '')


def table_lines(decided: Sequence[tuple[str, Judgement]], with_sweep: bool = True) -> list[str]:
  """The verdicts as a markdown table, one row per (sweep name, judgement)."""
  head = ['claim', 'paper', 'metric', 'runs: better vs than', 'means',
          'difference [95% CI]', 'pairs', 'relative: ours (paper)', 'p', 'Holm p', 'verdict']
  head = ['sweep', *head] if with_sweep else head
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, j in decided:
    c = j.claim
    means = (f'{fmt(c.metric, j.better)} vs {fmt(c.metric, j.than)}'
             if j.better is not None else '')
    relative = '' if j.relative is None else f'{100 * j.relative:+.2f}%'
    if c.paper_relative is not None:
      relative += f' ({100 * c.paper_relative:+.2f}%)'
    unit = c.unit or UNITS.get(c.metric, '')
    cells = [claim_cell(j), c.paper, f'{c.metric} ({unit})'.replace(' ()', ''),
             f'{c.better} vs {c.than}', means, _difference(j),
             f'{j.pairs}' + (f' ({j.left_out} left out)' if j.left_out else ''), relative, _p(j.p),
             _p(j.p_adjusted), _verdict_cell(j)]
    lines.append('| ' + ' | '.join([name, *cells] if with_sweep else cells) + ' |')
  return lines


def named(sweeps: Sequence[tuple[Sweep, str]], results_dir: str) -> list[tuple[str, Judgement]]:
  """(file stem, decided judgement) of every claim of the page."""
  names = [stem for sweep, stem in sweeps for _ in sweep.claims]
  return list(zip(names, judgements(sweeps, results_dir)))


def page_markdown(decided: Sequence[tuple[str, Judgement]]) -> str:
  """The page's table, with the count of each verdict and the size of the correction."""
  verdicts = [j.verdict for _, j in decided]
  counts = {v: verdicts.count(v)
            for v in (REPRODUCED, EQUIVALENT, CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE, PENDING)}
  summary = ', '.join(f'{n} {v}' for v, n in counts.items() if n)
  lines = [f'{len(decided)} claims: {summary}. Holm over the '
           f'{family_size([j for _, j in decided])} distinct comparisons tested; relative = '
           'difference / the `than` run\'s mean (the paper\'s in brackets, on its own '
           'baseline). Rule: `moejax/ablate/verdict.py`.', '', *table_lines(decided)]
  return '\n'.join(lines) + '\n'


def pyplot():
  """matplotlib.pyplot, drawing to files."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


LOSS_METRICS = ('final_nll', 'early_nll', 'best_nll', 'nll_at_equal_time')


def _forest_panel(ax, rows: Sequence[tuple[str, Judgement]], title: str):
  for i, (name, j) in enumerate(reversed(rows)):
    scale = 100 / abs(j.than)
    mean, low, high = (v * scale for v in (j.difference, *j.ci))
    ax.errorbar(mean, i, xerr=[[mean - low], [high - mean]], fmt='o',
                color=COLOURS[j.verdict], capsize=3)
    if j.claim.margin:
      ax.fill_betweenx([i - 0.4, i + 0.4], -j.claim.margin * scale, j.claim.margin * scale,
                       color='tab:blue', alpha=0.12)
  ax.axvline(0, color='k', lw=0.8)
  ax.set_yticks(range(len(rows)), [f'{name}: {j.claim.text}' for name, j in reversed(rows)],
                fontsize=7)
  ax.set_ylim(-0.6, len(rows) - 0.4)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3, axis='x')


def write_forest(path: str, decided: Sequence[tuple[str, Judgement]]):
  """Each tested claim's difference with its 95% interval, as a % of the `than` run's mean,
  margins shaded: loss claims (effects of about 1%) and the others (speed, routing: tens of %)
  in panels of their own."""
  plt = pyplot()
  tested = [(name, j) for name, j in decided if j.verdict in COLOURS and j.ci and j.than]
  groups = [(title, rows) for title, rows in (
      ('validation loss', [r for r in tested if r[1].claim.metric in LOSS_METRICS]),
      ('step time, time to target, routing', [r for r in tested
                                               if r[1].claim.metric not in LOSS_METRICS]))
            if rows]
  if not groups:
    groups = [('no claim tested yet', [])]
  heights = [max(len(rows), 1) for _, rows in groups]
  fig, axes = plt.subplots(len(groups), 1, figsize=(8, 0.32 * sum(heights) + 1.2 * len(groups)),
                           gridspec_kw={'height_ratios': heights}, squeeze=False)
  for ax, (title, rows) in zip(axes[:, 0], groups):
    _forest_panel(ax, rows, title)
  axes[-1, 0].set_xlabel('paired difference, % of the `than` run\'s mean (positive: as the '
                         'paper says), 95% CI', fontsize=8)
  for verdict, colour in COLOURS.items():
    axes[0, 0].plot([], [], 'o', color=colour, label=verdict)
  axes[0, 0].legend(fontsize=7, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_page(decided: Sequence[tuple[str, Judgement]], results_dir: str,
               suffix: str = '') -> list[str]:
  """verdicts<suffix>.md and .png in `results_dir` and, at the CPU scale (no suffix), the table
  between the markers of the RESULTS.md beside it (when it has them); the paths written."""
  text = page_markdown(decided)
  md, png = (os.path.join(results_dir, f'verdicts{suffix}.{ext}') for ext in ('md', 'png'))
  with open(md, 'w') as f:
    f.write(text)
  write_forest(png, decided)
  written = [md, png]
  results_md = os.path.join(os.path.dirname(os.path.abspath(results_dir)), 'RESULTS.md')
  if not suffix and os.path.exists(results_md):
    with open(results_md) as f:
      page = f.read()
    if BEGIN in page and END in page:
      before, rest = page.split(BEGIN, 1)
      with open(results_md, 'w') as f:
        f.write(before + BEGIN + '\n' + text + END + rest.split(END, 1)[1])
      written.append(results_md)
  return written


def results_block(results_md: str) -> str:
  """The table between the markers of a RESULTS.md ('' without them)."""
  with open(results_md) as f:
    page = f.read()
  if BEGIN not in page:
    return ''
  return page.split(BEGIN, 1)[1].split(END, 1)[0].lstrip('\n')
