"""A paper's claim as a test on a sweep's committed numbers, and its verdict by a standard test.

A `Claim` names two runs of a sweep ('E32', or 'top1@cf2.0' for an EVALS variant) and a number
the paper says `better` has lower than `than` (higher with `higher=True`). The runs are paired:
by seed for the runs' own numbers, by round for round-robin step times. Each pair gives a
difference d (than - better for a lower-is-better number: positive when the claim holds).

The rule, decided before the runs (`judge`, then `decide` over a page's claims):

  not testable here  a run of the claim is smaller than the claim's `needs` (parameters or
                     steps): the effect cannot show at this scale; the verdict names the scale
  pending            fewer pairs than `min_pairs` (8 seeds; 20 rounds of step times) are
                     committed: no verdict yet
  a directional claim: the two-sided paired t-test of mean d = 0, its p adjusted by Holm over
  every claim tested on the page (each distinct comparison counted once):
    reproduced       adjusted p < 0.05 and mean d > 0
    contradicted     adjusted p < 0.05 and mean d < 0
    inconclusive     otherwise
  a claim that something costs nothing (`margin` declared in the sweep file): the one-sided
  t-test of mean d > -margin (non-inferiority: not worse by more than the margin), its p
  adjusted with the others:
    equivalent       adjusted p < 0.05, and TOST puts |mean d| < margin (p < 0.05): it costs
                     nothing and gains nothing beyond the margin either
    reproduced       adjusted p < 0.05, not equivalent: no worse, and maybe better
    contradicted     the 95% interval of mean d lies wholly below -margin
    inconclusive     otherwise
A pair whose number is not finite (a diverged run), or a seed whose curve never reaches the
target, is left out; the tables say how many were.

Metrics besides a row's numbers:
  'step_time'       per-round train-step seconds from <sweep>_step_times.csv (round-robin in one
                    process: benchmarks/sweep_step_time.py)
  'time_to_target'  per seed: the steps the validation curve (<sweep>_curves.csv) takes to reach
                    `target` (linear interpolation between evaluations) times the run's median
                    round-robin step time; a seed whose curve never reaches it is left out
  'nll_at_equal_time'  per seed: both curves read at the training time of the shorter one
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from moejax.ablate import stats

REPRODUCED, CONTRADICTED, EQUIVALENT = 'reproduced', 'contradicted', 'equivalent'
INCONCLUSIVE, PENDING, NOT_TESTABLE = 'inconclusive', 'pending', 'not testable here'
ALPHA = 0.05
MIN_SEEDS, MIN_ROUNDS = 8, 20
CURVE_METRICS = ('time_to_target', 'nll_at_equal_time')


@dataclasses.dataclass(frozen=True)
class Scale:
  """The smallest runs at which a claim can show, and why (the papers' scale, usually)."""
  params: int = 0
  steps: int = 0
  why: str = ''

  def describe(self) -> str:
    sizes = [f'{self.params / 1e6:,.0f}M parameters' if self.params else '',
             f'{self.steps:,} steps' if self.steps else '']
    return ' and '.join(s for s in sizes if s) + (f': {self.why}' if self.why else '')


@dataclasses.dataclass(frozen=True)
class Claim:
  """One claim of a paper (module docstring). `paper`: its numbers in words; `paper_relative`:
  its effect over its baseline's value (e.g. 0.013 / 1.397), beside ours in the same ratio;
  `post_hoc`: said when the claim or its settings were added after seeing results; `unit`: the
  metric's unit where it is not the page's usual one (page.UNITS)."""
  text: str
  metric: str
  better: str
  than: str
  higher: bool = False
  margin: float | None = None
  target: float | None = None
  needs: Scale | None = None
  paper: str = ''
  paper_relative: float | None = None
  post_hoc: str = ''
  unit: str = ''

  @property
  def min_pairs(self) -> int:
    return MIN_ROUNDS if self.metric == 'step_time' else MIN_SEEDS


@dataclasses.dataclass(frozen=True)
class SweepNumbers:
  """What a sweep committed: its csv rows (parsed), validation curves {(run, seed): [(step,
  nll)]} and round-robin step times {run: {round: seconds}}."""
  rows: Sequence[Mapping]
  curves: Mapping[tuple, Sequence[tuple]] = dataclasses.field(default_factory=dict)
  step_times: Mapping[str, Mapping[int, float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Judgement:
  """A claim's numbers: the means of `better` and `than`, the mean difference d with its 95%
  interval, the test's p (two-sided t-test, or non-inferiority for a margin, with TOST's
  `p_tost`), and `p_adjusted` and `verdict` once `decide` has seen the page. `key` identifies
  the comparison across sweeps."""
  claim: Claim
  pairs: int
  left_out: int = 0
  better: float | None = None
  than: float | None = None
  difference: float | None = None
  ci: tuple[float, float] | None = None
  p: float | None = None
  p_tost: float | None = None
  status: str = ''  # NOT_TESTABLE or PENDING before the test; '' when tested
  key: tuple = ()
  p_adjusted: float | None = None
  verdict: str = ''

  @property
  def relative(self) -> float | None:
    """The difference over the `than` run's mean: comparable with `claim.paper_relative`."""
    if self.difference is None or not self.than:
      return None
    return self.difference / abs(self.than)


def row_key(row: Mapping) -> str:
  """A row's name in claims: its run, and '@' its EVALS variant when it has one."""
  return row['run'] + (f'@{row["eval"]}' if row.get('eval') else '')


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def reach_step(curve: Sequence[tuple], target: float) -> float | None:
  """The first step at which a validation curve [(step, nll)] is at or below `target`, linearly
  interpolated from the evaluation before; None when it never gets there."""
  previous = None
  for step, nll in curve:
    if nll <= target:
      if previous is None:
        return float(step)
      s0, n0 = previous  # n0 > target >= nll
      return s0 + (n0 - target) / (n0 - nll) * (step - s0)
    previous = (step, nll)
  return None


def _median_step_time(numbers: SweepNumbers, run: str) -> float | None:
  times = numbers.step_times.get(run)
  return float(np.median(list(times.values()))) if times else None


def paired_values(claim: Claim, numbers: SweepNumbers) -> tuple[dict, int]:
  """({pair (seed or round): (value of `better`, value of `than`)} where both are finite, how
  many pairs both runs have)."""
  if claim.metric == 'step_time':
    b, t = numbers.step_times.get(claim.better, {}), numbers.step_times.get(claim.than, {})
    rounds = sorted(set(b) & set(t))
    return {i: (b[i], t[i]) for i in rounds}, len(rounds)
  if claim.metric in CURVE_METRICS:
    return _curve_pairs(claim, numbers)
  values = {(row_key(r), r['seed']): r.get(claim.metric) for r in numbers.rows}
  pairs = {seed: (value, values[claim.than, seed]) for (name, seed), value in values.items()
           if name == claim.better and (claim.than, seed) in values}
  finite = {seed: pair for seed, pair in sorted(pairs.items()) if all(map(_finite, pair))}
  return finite, len(pairs)


def _curve_pairs(claim: Claim, numbers: SweepNumbers) -> tuple[dict, int]:
  step_time = {run: _median_step_time(numbers, run) for run in (claim.better, claim.than)}
  if None in step_time.values():
    return {}, 0
  pairs, seen = {}, 0
  for (run, seed), curve in sorted(numbers.curves.items()):
    other = numbers.curves.get((claim.than, seed))
    if run != claim.better or not other:
      continue
    seen += 1
    if claim.metric == 'time_to_target':
      steps = [reach_step(c, claim.target) for c in (curve, other)]
      if None not in steps:
        pairs[seed] = (steps[0] * step_time[claim.better], steps[1] * step_time[claim.than])
    else:
      timed = [[(s * step_time[r], n) for s, n in c] for r, c in ((run, curve),
                                                                  (claim.than, other))]
      end = min(t[-1][0] for t in timed)
      pair = tuple(float(np.interp(end, *zip(*t))) for t in timed)
      if all(map(_finite, pair)):
        pairs[seed] = pair
  return pairs, seen


def _too_small(claim: Claim, numbers: SweepNumbers) -> bool:
  if claim.needs is None:
    return False
  rows = [r for r in numbers.rows if row_key(r) in (claim.better, claim.than)]
  return any(_finite(r.get('params')) and r['params'] < claim.needs.params or
             _finite(r.get('steps')) and r['steps'] < claim.needs.steps for r in rows)


def _comparison(claim: Claim, pairs: dict) -> tuple:
  """The same comparison in two sweeps (the same runs: the same numbers) has the same key."""
  return (claim.metric, claim.target, claim.margin, tuple(sorted(pairs.items())))


def _test(d: np.ndarray, margin: float | None) -> tuple[tuple[float, float], float, float | None]:
  """(95% interval of the mean difference, p, TOST's p): the two-sided t-test, or with a margin
  the one-sided test of mean > -margin, and TOST. Equal differences have no variance: an
  interval of zero width and p 0 or 1 by where they lie."""
  if np.ptp(d) == 0:
    mean = float(d[0])
    if not margin:
      return (mean, mean), float(mean == 0), None
    return (mean, mean), float(mean <= -margin), float(abs(mean) >= margin)
  test = stats.paired_t_test(d)
  if not margin:
    return (test.ci_low, test.ci_high), test.p_two_sided, None
  no_worse = stats.paired_t_test(d + margin).p_greater
  return (test.ci_low, test.ci_high), no_worse, stats.tost(d, margin)


def judge(claim: Claim, numbers: SweepNumbers) -> Judgement:
  """The claim's numbers and its status before the page's correction (`decide` gives the
  verdict)."""
  pairs, seen = paired_values(claim, numbers)
  if _too_small(claim, numbers):
    status = NOT_TESTABLE
  elif len(pairs) < claim.min_pairs:
    status = PENDING
  else:
    status = ''
  if not pairs:
    return Judgement(claim, 0, seen, status=status or PENDING)
  better, than = (np.array(v, np.float64) for v in zip(*pairs.values()))
  d = (better - than) if claim.higher else (than - better)
  ci, p, p_tost = _test(d, claim.margin) if len(d) > 1 else (None, None, None)
  return Judgement(claim, len(d), seen - len(d), better=float(better.mean()),
                   than=float(than.mean()), difference=float(d.mean()), ci=ci, p=p,
                   p_tost=p_tost, status=status, key=_comparison(claim, pairs))


def _verdict(j: Judgement) -> str:
  if j.status:
    return j.status
  significant = j.p_adjusted < ALPHA
  if j.claim.margin:
    if significant:
      return EQUIVALENT if j.p_tost < ALPHA else REPRODUCED
    return CONTRADICTED if j.ci[1] < -j.claim.margin else INCONCLUSIVE
  if not significant:
    return INCONCLUSIVE
  return REPRODUCED if j.difference > 0 else CONTRADICTED


def decide(judgements: Sequence[Judgement]) -> list[Judgement]:
  """Every judgement with its Holm-adjusted p (over the distinct comparisons tested on the page)
  and its verdict (module docstring)."""
  tested = {}
  for j in judgements:
    if not j.status:
      tested.setdefault(j.key, j.p)
  adjusted = dict(zip(tested, stats.holm(list(tested.values())))) if tested else {}
  out = []
  for j in judgements:
    j = dataclasses.replace(j, p_adjusted=None if j.status else adjusted[j.key])
    out.append(dataclasses.replace(j, verdict=_verdict(j)))
  return out


def family_size(judgements: Sequence[Judgement]) -> int:
  """How many distinct comparisons the correction ran over."""
  return len({j.key for j in judgements if not j.status})
