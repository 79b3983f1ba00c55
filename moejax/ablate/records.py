"""What a sweep reports of a run, read from its metrics.jsonl rows (NumPy, no JAX).

Validation numbers are the evaluations' (the eval capacity factor, the whole eval split unless
`eval.max_batches`); train numbers the logged train steps'. Definitions:

  final_nll, best_nll    the last and the lowest validation NLL (nats/token)
  early_nll, early_step  the first evaluation's NLL and its step (early training)
  train_fraction_dropped mean over the last 50 logged train steps of the fraction of token
                         choices dropped by capacity (train capacity factor)
  eval_fraction_dropped  the same in the last evaluation (eval capacity factor)
  usage_cv               expert-usage spread: the coefficient of variation (std / mean) of the
                         last evaluation's expert usage, per MoE layer, averaged over layers
                         (0: perfectly balanced; sqrt(E - 1): every token to one expert)
  max_vio                the papers' MaxVio (Wang et al., arXiv:2408.15664, eq. 9): a layer's
                         largest expert load over its mean load, minus 1, in each of the last
                         50 logged train steps (loads counted before capacity), averaged over
                         MoE layers and those steps (0: balanced; E - 1: one expert takes all)
  max_router_logit       the largest |router logit| of any real token in any logged train step
  nonfinite_steps        updates skipped because the loss or gradient was not finite
  step_time              median seconds of a train step (the compiling first step is an outlier
                         the median ignores); tokens_per_sec the tokens of a step over it
  steps                  train steps done
and, from the runner: params and mflops_per_token (the model's, from its shapes; forward matmul
FLOPs per token), diverged (training stopped on `train.max_nonfinite_in_a_row` non-finite steps
in a row) and wall_time (seconds of the run's sessions that ended cleanly, evaluation included).
Curves (validation NLL at each evaluation) time a step at the median step time: 'seconds' =
step x step_time, the training time without compilation and evaluation.
"""
from __future__ import annotations

import math
import os

import numpy as np

from moejax.train.metrics import read_metrics

LAST_TRAIN_STEPS = 50  # train fraction dropped, max_vio: the mean over this many last logged steps
# The numbers of every run's record (`run_record`, plus what the runner adds).
RECORD = ('final_nll', 'best_nll', 'early_nll', 'early_step', 'train_fraction_dropped',
          'eval_fraction_dropped', 'usage_cv', 'max_vio', 'max_router_logit', 'nonfinite_steps',
          'step_time', 'tokens_per_sec', 'steps', 'params', 'mflops_per_token', 'diverged', 'wall_time')


def read_rows(workdir: str) -> list[dict]:
  """The rows of <workdir>/metrics.jsonl; [] when it does not exist. A resumed run appended its
  rows: a step logged twice (steps after the last checkpoint, redone) keeps its last row."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = read_metrics(path)
  latest = {(row['split'], row['step']): row for row in rows}
  return sorted(latest.values(), key=lambda row: (row['step'], row['split'] == 'eval'))


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'section.field': value} of a nested config dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def usage_cv(metrics: dict) -> float | None:
  """Mean over MoE layers of std / mean of 'expert_usage/<layer>'; None without MoE layers."""
  usages = [np.asarray(v, np.float64) for k, v in metrics.items() if k.startswith('expert_usage/')]
  if not usages:
    return None
  return float(np.mean([u.std() / max(u.mean(), 1e-12) for u in usages]))


def max_vio(metrics: dict) -> float | None:
  """Mean over MoE layers of max(load) / mean(load) - 1 of 'expert_usage/<layer>'; None without
  MoE layers."""
  usages = [np.asarray(v, np.float64) for k, v in metrics.items() if k.startswith('expert_usage/')]
  if not usages:
    return None
  return float(np.mean([u.max() / max(u.mean(), 1e-12) - 1.0 for u in usages]))


def _values(rows: list[dict], name: str) -> list[float]:
  return [row[name] for row in rows if row.get(name) is not None]


def run_record(rows: list[dict], tokens_per_step: int) -> dict:
  """The numbers of a run (module docstring) from its metrics rows."""
  train = [row for row in rows if row['split'] == 'train']
  evals = [row for row in rows if row['split'] == 'eval']
  nll = [row['nll'] for row in evals]
  step_seconds = [tokens_per_step / r for r in _values(train, 'tokens_per_sec') if r > 0]
  step_time = float(np.median(step_seconds)) if step_seconds else None
  last_train = train[-LAST_TRAIN_STEPS:]
  dropped = _values(last_train, 'fraction_dropped')
  violations = [v for v in map(max_vio, last_train) if v is not None]
  logits = _values(train, 'router_max_logit')
  last = evals[-1] if evals else {}
  return {
      'final_nll': nll[-1] if nll else None,
      'best_nll': min(nll, key=lambda v: v if math.isfinite(v) else math.inf) if nll else None,
      'early_nll': nll[0] if nll else None,
      'early_step': evals[0]['step'] if evals else None,
      'train_fraction_dropped': float(np.mean(dropped)) if dropped else None,
      'eval_fraction_dropped': last.get('fraction_dropped'),
      'usage_cv': usage_cv(last),
      'max_vio': float(np.mean(violations)) if violations else None,
      'max_router_logit': max(logits) if logits else None,
      'nonfinite_steps': int(train[-1]['nonfinite_total']) if train else 0,
      'step_time': step_time,
      'tokens_per_sec': tokens_per_step / step_time if step_time else None,
      'steps': train[-1]['step'] if train else 0,
  }


def eval_curve(rows: list[dict], step_time: float | None, metric: str = 'nll') -> list[dict]:
  """[{'step', 'seconds', metric}] of every evaluation (seconds = step x median step time)."""
  return [{'step': row['step'], 'seconds': row['step'] * (step_time or math.nan),
           metric: row[metric]}
          for row in rows if row['split'] == 'eval' and metric in row]


def eval_record(metrics: dict) -> dict:
  """The validation numbers of an evaluation (`moejax.train.evaluation.evaluate`'s metrics) under the
  record's names: a run's numbers under one of a sweep's EVALS variants (which replace those of
  the evaluations during training: best and early NLL are then None)."""
  return {'final_nll': float(metrics['nll']), 'best_nll': None, 'early_nll': None,
          'early_step': None,
          'eval_fraction_dropped': (float(metrics['fraction_dropped'])
                                    if 'fraction_dropped' in metrics else None),
          'usage_cv': usage_cv(metrics)}
