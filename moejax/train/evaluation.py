"""Validation metrics of a run's params: nats per token (and per character for a language
model), routing statistics, summed over the eval split's batches."""
from __future__ import annotations

import jax
import numpy as np

from moejax.train.run import Run
from moejax.train.stopping import StopRequest, agreed_stop


def evaluate(run: Run, params, eval_step=None, bias_state=None,
             stop: StopRequest | None = None) -> dict | None:
  """Validation metrics over the eval split (eval capacity factor); nats per token and per char.
  bias_state: the train state's `balancing_bias_state` (models with balancing biases).
  stop: `stop_requests()`'s request; when a stop is agreed between batches, returns None."""
  cfg = run.config
  eval_step = eval_step or run.eval_step(params)
  totals = {}
  for batch in run.eval_batches:
    if stop is not None and agreed_stop(stop):
      return None
    metrics = eval_step(params, run.to_global(batch), bias_state)
    for name, value in jax.device_get(metrics).items():
      totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
  tokens = max(float(totals.pop('tokens')), 1.0)
  metrics = {name: value / tokens for name, value in totals.items()}
  metrics['nll'] = metrics.pop('nll_sum')
  if cfg.task == 'lm':
    metrics['nats_per_char'] = metrics['nll'] / run.chars_per_token
  return metrics
