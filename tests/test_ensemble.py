"""moejax.ensemble: hand-checked weights and NLLs, BMA's collapse, stacking's optimum."""
import numpy as np
import pytest

from moejax.ensemble import METHODS, ensemble_weights, mixture_nll, stacking_weights

RNG = np.random.default_rng(0)


def complementary(n=2000):
  """Two members, each sharp on its own half of the tokens and poor on the other: log p [2, N]."""
  good, poor = np.log(0.8), np.log(0.05)
  first = np.arange(n) < n // 2
  return np.stack([np.where(first, good, poor), np.where(first, poor, good)])


def test_mixture_nll_by_hand():
  log_probs = np.log([[0.5, 0.1], [0.1, 0.3]])  # 2 members, 2 tokens
  expected = -np.mean(np.log([0.25 * 0.5 + 0.75 * 0.1, 0.25 * 0.1 + 0.75 * 0.3]))
  assert mixture_nll(log_probs, [0.25, 0.75]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('method', METHODS)
def test_identical_members_give_the_member(method):
  member = np.log(RNG.uniform(0.01, 1.0, size=500))
  log_probs = np.stack([member] * 3)
  weights = ensemble_weights(method, log_probs)
  assert weights.sum() == pytest.approx(1.0) and np.all(weights >= 0)
  assert mixture_nll(log_probs, weights) == pytest.approx(-member.mean(), rel=1e-9)


def test_validation_weights_are_per_token_likelihoods():
  log_probs = np.log([[0.5, 0.5], [0.25, 0.25]])  # perplexities 2 and 4
  np.testing.assert_allclose(ensemble_weights('validation', log_probs), [2 / 3, 1 / 3])
  np.testing.assert_allclose(ensemble_weights('average', log_probs), [0.5, 0.5])


def test_bma_collapses_onto_the_best_member():
  better = np.log(RNG.uniform(0.3, 0.6, size=5000))
  log_probs = np.stack([better - 0.01, better, better - 0.02])  # member 1 best by 0.01 nats
  weights = ensemble_weights('bma', log_probs)
  assert weights[1] > 1 - 1e-12
  assert ensemble_weights('validation', log_probs)[1] < 0.34  # smooth, nearly uniform


def test_stacking_matches_a_grid_search_and_beats_every_member():
  log_probs = complementary()
  log_probs[0, :300] = np.log(0.9)  # member 0 a little better: the optimum is not 1/2
  def grid_search(grid):
    return grid[np.argmin([mixture_nll(log_probs, [w, 1 - w]) for w in grid])]
  coarse = grid_search(np.linspace(0.0, 1.0, 1001))
  optimum = grid_search(np.linspace(coarse - 1e-3, coarse + 1e-3, 201))  # steps of 1e-5
  weights = stacking_weights(log_probs)
  assert weights[0] == pytest.approx(optimum, abs=2e-5) and weights[0] > 0.5
  stacked = mixture_nll(log_probs, weights)
  assert stacked < min(-log_probs.mean(axis=1)) - 0.5  # far better than either member alone
  for method in METHODS:
    assert stacked <= mixture_nll(log_probs, ensemble_weights(method, log_probs)) + 1e-12


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match='unknown'):
    ensemble_weights('median', np.log(np.full((2, 3), 0.5)))
  with pytest.raises(ValueError, match=r'\[members, tokens\]'):
    ensemble_weights('average', np.zeros(3))
  with pytest.raises(ValueError, match='log-probabilities'):
    mixture_nll(np.ones((2, 3)), [0.5, 0.5])
