"""What a finished (or stopped) training run reports: the summary dict and the end-of-run text."""
from __future__ import annotations

import jax
import numpy as np

from moejax.models import per_token_flops
from moejax.train.step import has_moe


def summarize(run, state, stopped_by: str | None, eval_metrics: dict, step_seconds: list,
              train_dropped: list) -> dict:
  """The summary `loop.train` returns: the final step, why it stopped, the last evaluation,
  the median speed (the first, compiling step left out), FLOPs, drops, the state and the run."""
  config = run.config
  tokens_per_step = config.train.batch_size * config.data.length
  timed = step_seconds[1:] or step_seconds
  return {'step': int(jax.device_get(state.step)), 'stopped_by': stopped_by,
          'eval': eval_metrics,
          'tokens_per_sec': tokens_per_step / float(np.median(timed)) if timed else None,
          'nonfinite_total': int(jax.device_get(state.nonfinite_total)),
          'per_token_flops': per_token_flops(run.model_config, config.data.length),
          'train_fraction_dropped': float(np.mean(train_dropped[-50:])) if train_dropped else None,
          'has_moe': has_moe(run.model_config), 'state': state, 'run': run}


def format_summary(summary: dict) -> str:
  """The end-of-run report: validation loss, speed, expert usage, fraction dropped."""
  ev = summary['eval']
  lines = [f'step {summary["step"]}' + (f' (stopped by {summary["stopped_by"]})'
                                        if summary['stopped_by'] else '')]
  if ev:
    loss = f'validation loss {ev["nll"]:.4f} nats/token'
    if 'nats_per_char' in ev:
      loss += f', {ev["nats_per_char"]:.4f} nats/char'
    lines.append(loss)
  if summary['tokens_per_sec']:
    lines.append(f'train speed {summary["tokens_per_sec"]:,.0f} tokens/s '
                 f'({summary["per_token_flops"] / 1e6:.2f} MFLOP/token forward)')
  lines.append(f'non-finite steps skipped: {summary["nonfinite_total"]}')
  if ev and summary['has_moe']:
    cfg = summary['run'].model_config
    dropped = f'eval (capacity factor {cfg.eval_capacity_factor}) {ev["fraction_dropped"]:.4f}'
    if summary['train_fraction_dropped'] is not None:
      dropped = (f'train (capacity factor {cfg.train_capacity_factor}, last 50 steps) '
                 f'{summary["train_fraction_dropped"]:.4f}, ' + dropped)
    lines.append(f'fraction of token choices dropped: {dropped}')
    lines.append(f'eval load-balancing loss {ev["load_balancing_loss"]:.3f} (1 = uniform), '
                 f'router z-loss {ev["router_z_loss"]:.3f}; expert usage per layer:')
    for name, usage in ev.items():
      if name.startswith('expert_usage/'):
        lines.append(f'  usage {name[len("expert_usage/"):]:<24} '
                     + ' '.join(f'{u:.2f}' for u in np.ravel(usage)))
  return '\n'.join(lines)
