"""The standard tests a claim's verdict rests on: paired t-test with a confidence interval of the
mean difference, two one-sided tests (TOST) of equivalence within a margin, and Holm's
correction over the claims of a page. NumPy and scipy.stats' t distribution only.

A claim is judged on per-seed paired differences d_i = (than - better) for a lower-is-better
number, positive when the claim holds. For n >= 2 seeds, mean m, sample std s, standard error
se = s / sqrt(n), t = m / se with n - 1 degrees of freedom.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class PairedTest:
  """A paired t-test of the mean of differences d against zero: both one-sided and two-sided p,
  and the confidence interval of the mean."""
  n: int
  mean: float
  se: float
  t: float
  p_greater: float   # one-sided p of mean > 0
  p_two_sided: float
  ci_low: float      # the two-sided confidence interval of the mean difference
  ci_high: float
  confidence: float


def interval_half_width(values: Sequence[float], confidence: float = 0.95) -> float:
  """Half the width of the t confidence interval of the mean of `values` (0 for fewer than 2)."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return 0.0
  return float(scipy_stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1)
               / math.sqrt(len(v)))


def paired_t_test(differences: Sequence[float], confidence: float = 0.95) -> PairedTest:
  """The paired t-test of `differences` (n >= 2, not all equal) and the `confidence` interval of
  their mean: what `scipy.stats.ttest_1samp(differences, 0)` gives, with both p-values."""
  d = np.asarray(differences, np.float64)
  n = len(d)
  if n < 2:
    raise ValueError(f'a paired t-test needs at least 2 differences; got {n}')
  if np.ptp(d) == 0:
    raise ValueError('the differences are all equal: no variance to test against')
  mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
  t = mean / se
  dist = scipy_stats.t(df=n - 1)
  half = interval_half_width(d, confidence)
  return PairedTest(n=n, mean=mean, se=se, t=t, p_greater=float(dist.sf(t)),
                    p_two_sided=float(2 * dist.sf(abs(t))), ci_low=mean - half,
                    ci_high=mean + half, confidence=confidence)


def tost(differences: Sequence[float], margin: float) -> float:
  """p of two one-sided tests that the mean difference lies within (-margin, margin): the larger
  of the p-values of 'mean > -margin' and 'mean < margin'. Small p: equivalent within the
  margin, declared before the run (a claim that something 'costs nothing')."""
  if margin <= 0:
    raise ValueError(f'an equivalence margin must be > 0; got {margin}')
  d = np.asarray(differences, np.float64)
  above = paired_t_test(d + margin).p_greater         # H0: mean <= -margin
  below = paired_t_test(margin - d).p_greater         # H0: mean >= margin
  return max(above, below)


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values, in the order given: the k-th smallest of m is multiplied
  by (m - k + 1), made non-decreasing in that order, capped at 1. Reject where adjusted < alpha:
  the family-wise error rate stays below alpha over the m claims."""
  p = np.asarray(p_values, np.float64)
  m = len(p)
  order = np.argsort(p, kind='stable')
  adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
  out = np.empty(m)
  out[order] = adjusted
  return out.tolist()
