"""Training capacity factor, top-1 vs top-2 (Switch Transformer Table 1).

Claim: lower capacity factors are faster per step; 1.0-1.25 is the sweet spot of speed and
quality; top-1 (Switch) beats top-2 at equal time. Switch-Base (128 experts) at 100k steps:
neg. log perplexity -1.561 / -1.553 / -1.554 at CF 1.0 / 1.25 / 2.0 (top-1), -1.572 / -1.559 /
-1.547 (top-2); 1000 / 910 / 860 and 860 / 790 / 840 examples/s. Here: 8 experts, top-1 and top-2
at train CF 0.5, 0.75, 1.0, 1.25, 2.0 (eval CF 2.0 throughout), 8 seeds, validation every 25
steps on 8 batches (64k tokens). The sweet spot is a claim about time to a quality: each run's
time to reach 2.25 nats/byte is the step its curve gets there times its step time measured
round-robin in one process (capacity_step_times.csv); the step-time claims rest on those rounds.
The paper's step times (the inverse of its examples/s, relative to CF 1.0) are drawn on the
step-time plot.

Measured on the 2-core CPU: 37 min (80 runs, all trained; 2026-12-06).
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
RUNS = {f'top{k}_cf{cf}': {'model.num_selected_experts': k, 'model.train_capacity_factor': cf}
        for k in (1, 2) for cf in (0.5, 0.75, 1.0, 1.25, 2.0)}
SEEDS = tuple(range(8))
# A validation curve (8 batches, 64k tokens, every 25 steps): the time to a target loss.
SCALE = {'small': {'eval.every_steps': 25, 'eval.max_batches': 8},
         'base': {'model.num_experts': 128, 'eval.every_steps': 5_000}}
CF, K = 'model.train_capacity_factor', 'model.num_selected_experts'
PLOTS = (
    Panel(x=CF, y='final_nll', series=K, note='Switch Table 1: CF 1.0-1.25 is the sweet spot'),
    Panel(x=CF, y='train_fraction_dropped', series=K),
    Panel(x=CF, y='step_time', series=K, relative_to={CF: 1.0}, relative='ratio',
          paper={'Switch Table 1, top-1': [(1.0, 1.0), (1.25, 1000 / 910), (2.0, 1000 / 860)],
                 'Switch Table 1, top-2': [(1.0, 1.0), (1.25, 860 / 790), (2.0, 860 / 840)]}),
    Panel(curve=True, x='seconds', y='nll', title='validation loss vs training time',
          note='Switch Table 1: hours to -1.50; here seconds to 2.25 nats/byte'),
)
TARGET = 2.25  # nats/byte: every run gets there within 200 steps (the time-to-quality claims)
CLAIMS = (
    Claim('top-1: CF 1.0 steps faster than CF 2.0', 'step_time', 'top1_cf1.0', 'top1_cf2.0',
          paper='Switch Table 1: 1000 vs 860 ex/s', paper_relative=1 - 860 / 1000),
    Claim('top-1: CF 0.5 steps faster than CF 1.0', 'step_time', 'top1_cf0.5', 'top1_cf1.0'),
    Claim('top-1 steps faster than top-2 at CF 1.25', 'step_time', 'top1_cf1.25', 'top2_cf1.25',
          paper='Switch Table 1: 910 vs 790 ex/s', paper_relative=1 - 790 / 910),
    Claim('top-1: CF 1.25 drops fewer tokens than 1.0', 'train_fraction_dropped', 'top1_cf1.25',
          'top1_cf1.0'),
    Claim('top-1: CF 1.25 better than CF 0.5', 'final_nll', 'top1_cf1.25', 'top1_cf0.5'),
    Claim('top-1: CF 1.25 reaches the target sooner than CF 2.0 (the sweet spot)',
          'time_to_target', 'top1_cf1.25', 'top1_cf2.0', target=TARGET,
          paper='Switch Table 1: 65.0 vs 72.8 h to -1.50', paper_relative=1 - 65.0 / 72.8,
          post_hoc='the target'),
    Claim('top-1: CF 1.0 reaches the target sooner than CF 2.0', 'time_to_target', 'top1_cf1.0',
          'top1_cf2.0', target=TARGET, paper='Switch Table 1: 62.8 vs 72.8 h',
          paper_relative=1 - 62.8 / 72.8, post_hoc='the target'),
    Claim('top-1 reaches the target sooner than top-2 at CF 1.25', 'time_to_target',
          'top1_cf1.25', 'top2_cf1.25', target=TARGET, paper='Switch Table 1: 65.0 vs 80.7 h',
          paper_relative=1 - 65.0 / 80.7, post_hoc='the target'),
)
