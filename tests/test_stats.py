"""moejax.ablate.stats: the paired t-test and its interval against scipy on fixed numbers, TOST and
Holm on cases checked by hand."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from moejax.ablate.stats import holm, paired_t_test, tost

# The committed per-seed differences of "top-1 Switch beats its dense twin" (nats/byte), and a
# made-up set of eight.
SWITCH_VS_DENSE = [0.006, 0.035, 0.026]
EIGHT = [0.012, -0.004, 0.021, 0.009, 0.015, 0.003, 0.018, 0.007]


@pytest.mark.parametrize('differences', [SWITCH_VS_DENSE, EIGHT, [-1.5, 0.25, -0.75, 2.0]])
def test_the_paired_t_test_is_scipys(differences):
  ours = paired_t_test(differences, confidence=0.95)
  theirs = scipy_stats.ttest_1samp(differences, 0.0)
  assert ours.t == pytest.approx(theirs.statistic, abs=1e-10)
  assert ours.p_two_sided == pytest.approx(theirs.pvalue, abs=1e-10)
  greater = scipy_stats.ttest_1samp(differences, 0.0, alternative='greater')
  assert ours.p_greater == pytest.approx(greater.pvalue, abs=1e-10)
  low, high = theirs.confidence_interval(0.95)
  assert (ours.ci_low, ours.ci_high) == (pytest.approx(low, abs=1e-10),
                                         pytest.approx(high, abs=1e-10))


def test_the_switch_claim_by_hand():
  """Mean 0.067 / 3 = 0.022333; squared deviations 2.6678e-4 + 1.6044e-4 + 1.344e-5 = 4.4067e-4,
  sd sqrt(4.4067e-4 / 2) = 0.014844, se 0.014844 / sqrt(3) = 0.0085700, t 2.6060 on 2 degrees
  of freedom: one-sided p 0.0605, not under 0.05 (the 2-SE rule called it reproduced)."""
  result = paired_t_test(SWITCH_VS_DENSE)
  assert result.mean == pytest.approx(0.0223333, abs=1e-7)
  assert result.se == pytest.approx(0.0148436 / math.sqrt(3), abs=1e-7)
  assert result.t == pytest.approx(2.6060, abs=1e-4)
  assert 0.05 < result.p_greater < 0.07


def test_tost_is_the_larger_of_two_one_sided_tests():
  # Mean 0.001, se 0.00115 (differences -0.001, 0.001, 0.003): within 0.01 clearly, within 0.0015
  # not at all.
  d = [-0.001, 0.001, 0.003]
  upper = scipy_stats.ttest_1samp(d, 0.01, alternative='less').pvalue
  lower = scipy_stats.ttest_1samp(d, -0.01, alternative='greater').pvalue
  assert tost(d, 0.01) == pytest.approx(max(upper, lower), abs=1e-10)
  assert tost(d, 0.01) < 0.01
  assert tost(d, 0.0015) > 0.3
  with pytest.raises(ValueError, match='margin'):
    tost(d, 0.0)


def test_holm_by_hand():
  # m = 4: sorted 0.01, 0.02, 0.03, 0.04 -> x4, x3, x2, x1 = 0.04, 0.06, 0.06, 0.04 -> running
  # max 0.04, 0.06, 0.06, 0.06; given back in the input order.
  assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
  assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped
  assert holm([0.001]) == [0.001]
  # A rejection at alpha 0.05 survives only where the adjusted value is below it.
  assert [p < 0.05 for p in holm([0.01, 0.04, 0.03])] == [True, False, False]


def test_too_few_or_constant_differences_are_refused():
  with pytest.raises(ValueError, match='at least 2'):
    paired_t_test([0.1])
  with pytest.raises(ValueError, match='all equal'):
    paired_t_test([0.1, 0.1, 0.1])
  assert np.isfinite(paired_t_test([0.1, 0.2]).t)
