"""A paper's claim as a test on a sweep's rows, and its verdict by the two-standard-error rule.

A `Claim` names two runs of a sweep ('E32', or 'top1@cf2.0' for an EVALS variant) and a number:
the paper says `better` has a lower one than `than` (or a higher one, `higher=True`), or, with
`no_worse=True`, that `better` costs nothing against `than`. The runs are paired by seed; the
difference is the mean over the shared seeds of (than - better) for lower-is-better numbers (so
it is positive when the claim holds), its standard error the sample std of the per-seed
differences over sqrt(seeds). Verdicts:

  reproduced          the difference is positive and larger than twice its standard error
                      (no_worse: the difference is not negative by more than twice it)
  not reproduced      the difference is negative and larger than twice its standard error
  not shown           within twice its standard error either way (or one seed: no standard
                      error; the sweep's docstring says what bounds the noise instead)

`at_equal_time=True` compares validation NLL at equal training time rather than a record field:
per seed, each run's curve (NLL against steps x median step time) is read at the end time of
the run that trained for less time (linear interpolation between evaluations).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

REPRODUCED, NOT_REPRODUCED, NOT_SHOWN = 'reproduced', 'not reproduced', 'not shown'


@dataclasses.dataclass(frozen=True)
class Claim:
  text: str
  metric: str
  better: str
  than: str
  higher: bool = False
  no_worse: bool = False
  at_equal_time: bool = False


def row_key(row: dict) -> str:
  """A row's name in claims: its run, and '@' its EVALS variant when it has one."""
  return row['run'] + (f'@{row["eval"]}' if row.get('eval') else '')


def nll_at(curve: list[dict], seconds: float) -> float:
  """The validation NLL of a curve ([{'seconds', 'nll'}]) at `seconds` (linear interpolation)."""
  return float(np.interp(seconds, [p['seconds'] for p in curve], [p['nll'] for p in curve]))


def paired_values(claim: Claim, rows: list[dict], results: list[dict]) -> dict[int, tuple]:
  """{seed: (value of `better`, value of `than`)} over the seeds both runs finished."""
  if claim.at_equal_time:
    curves = {(r['name'], r['seed']): r['curve'] for r in results}
    pairs = {}
    for (name, seed), curve in curves.items():
      other = curves.get((claim.than, seed))
      if name == claim.better and curve and other:
        end = min(curve[-1]['seconds'], other[-1]['seconds'])
        pairs[seed] = (nll_at(curve, end), nll_at(other, end))
    return pairs
  values = {}
  for row in rows:
    value = row.get(claim.metric)
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
      values[row_key(row), row['seed']] = float(value)
  return {seed: (values[claim.better, seed], values[claim.than, seed])
          for (name, seed) in values if name == claim.better and (claim.than, seed) in values}


def judge(claim: Claim, rows: list[dict], results: list[dict]) -> dict:
  """The claim's numbers and verdict: {'better', 'than' (means), 'difference', 'se', 'seeds',
  'verdict'}; difference > 0 means the claim's direction."""
  pairs = paired_values(claim, rows, results)
  if not pairs:
    return {'better': None, 'than': None, 'difference': None, 'se': None, 'seeds': 0,
            'verdict': 'no runs'}
  better, than = (np.array(v) for v in zip(*pairs.values()))
  diffs = (better - than) if claim.higher else (than - better)
  difference = float(np.mean(diffs))
  se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else None
  if se is None or not math.isfinite(difference):
    verdict = NOT_SHOWN
  elif claim.no_worse:
    verdict = NOT_REPRODUCED if difference < -2 * se else REPRODUCED
  else:
    verdict = (REPRODUCED if difference > 2 * se else
               NOT_REPRODUCED if difference < -2 * se else NOT_SHOWN)
  return {'better': float(np.mean(better)), 'than': float(np.mean(than)),
          'difference': difference, 'se': se, 'seeds': len(diffs), 'verdict': verdict}


def verdict_lines(claims: tuple[Claim, ...], rows: list[dict], results: list[dict],
                  fmt: Callable[[str, float], str]) -> list[str]:
  """The md table of the claims' verdicts, numbers written by fmt(metric, value)."""
  if not claims:
    return []
  lines = ['## Verdicts', '',
           'Paired by seed; difference = how far the claim\'s direction holds (positive: as the '
           'paper says), ± its standard error; reproduced when it exceeds twice that (rule in '
           '`moejax/ablate/verdict.py`).', '',
           '| claim | metric | runs | mean of each | difference ± SE | seeds | verdict |',
           '|---|---|---|---|---|---|---|']
  for claim in claims:
    j = judge(claim, rows, results)
    metric = 'final_nll' if claim.at_equal_time else claim.metric
    number = lambda v: '' if v is None else fmt(metric, v)
    se = f' ± {number(j["se"])}' if j['se'] is not None else ' (one seed)'
    lines.append(f'| {claim.text} | {"NLL at equal time" if claim.at_equal_time else metric} | '
                 f'{claim.better} vs {claim.than} | {number(j["better"])} vs {number(j["than"])} | '
                 f'{number(j["difference"])}{se} | {j["seeds"]} | **{j["verdict"]}** |')
  return lines
