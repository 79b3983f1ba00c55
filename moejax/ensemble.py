"""Ensembles of trained models: mix the members' predictive distributions.

An ensemble here is a linear pool, p(y | x) = sum_m w_m p_m(y | x), with weights w [M] on the
simplex. Every method below fits w from one array, the members' log-probabilities of the observed
tokens of a validation split, `log_probs [M, N]` (member m, token n); the ensemble is then judged
by `mixture_nll` on tokens it was not fit on. Axis letters: M members, N tokens.

  'average'     w_m = 1 / M.
  'validation'  w_m proportional to exp(mean_n log p_m(y_n)), each member's per-token validation
                likelihood (1 / its perplexity): better members count more, smoothly.
  'bma'         Bayesian model averaging, uniform prior: w_m = p(m | validation) proportional to
                prod_n p_m(y_n). With many tokens it puts (almost) all weight on the member with
                the best validation likelihood: a model-selection rule, not a mixture.
  'stacking'    the weights that maximize the mixture's validation log-likelihood (stacking of
                predictive distributions, Yao et al. 2018), fit by expectation-maximization; the
                objective is concave in w, so EM reaches its maximum.

Pure NumPy (float64); `moejax.train.step.token_log_probs` gives a member's log-probabilities.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

METHODS = ('average', 'validation', 'bma', 'stacking')


def _check(log_probs: np.ndarray) -> np.ndarray:
  log_probs = np.asarray(log_probs, np.float64)
  if log_probs.ndim != 2 or 0 in log_probs.shape:
    raise ValueError(f'log_probs must be [members, tokens] and non-empty; got shape '
                     f'{log_probs.shape}')
  if np.any(log_probs > 1e-6) or not np.all(np.isfinite(log_probs)):
    raise ValueError('log_probs must be finite log-probabilities (<= 0)')
  return log_probs


def mixture_nll(log_probs: np.ndarray, weights: np.ndarray) -> float:
  """Mean NLL (nats per token) of the linear pool: -mean_n log sum_m w_m p_m(y_n)."""
  log_probs = _check(log_probs)  # Shape: [M, N]
  with np.errstate(divide='ignore'):  # a zero weight is log 0 = -inf, fine inside logsumexp
    log_weights = np.log(np.asarray(weights, np.float64))[:, None]  # Shape: [M, 1]
  return float(-np.mean(logsumexp(log_weights + log_probs, axis=0)))


def stacking_weights(log_probs: np.ndarray, max_iterations: int = 2000,
                     tolerance: float = 1e-10) -> np.ndarray:
  """argmax_w mean_n log sum_m w_m p_m(y_n) over the simplex, by EM: w_m <- mean_n r_mn, where
  r_mn = w_m p_m(y_n) / sum_j w_j p_j(y_n) is member m's responsibility for token n. Each step
  raises the log-likelihood; it stops when the gain is below `tolerance` nats per token."""
  log_probs = _check(log_probs)  # Shape: [M, N]
  weights = np.full(len(log_probs), 1.0 / len(log_probs))  # Shape: [M]
  previous = -np.inf
  for _ in range(max_iterations):
    with np.errstate(divide='ignore'):
      joint = np.log(weights)[:, None] + log_probs  # Shape: [M, N]
    likelihood = float(np.mean(logsumexp(joint, axis=0)))
    if likelihood - previous < tolerance:
      break
    previous = likelihood
    weights = softmax(joint, axis=0).mean(axis=1)
  return weights


def ensemble_weights(method: str, log_probs: np.ndarray) -> np.ndarray:
  """Mixture weights [M] fit by `method` (see the module docstring) on validation log_probs
  [M, N]."""
  log_probs = _check(log_probs)
  if method == 'average':
    return np.full(len(log_probs), 1.0 / len(log_probs))
  if method == 'validation':
    return softmax(log_probs.mean(axis=1))
  if method == 'bma':
    return softmax(log_probs.sum(axis=1))
  if method == 'stacking':
    return stacking_weights(log_probs)
  raise ValueError(f'ensemble method {method!r} is unknown: it must be one of {METHODS}')
