"""Training capacity factor, top-1 vs top-2 (Switch Transformer Table 1).

Claim: lower capacity factors are faster per step; 1.0-1.25 is the sweet spot of speed and
quality; top-1 (Switch) beats top-2 at equal time. Switch-Base (128 experts) at 100k steps:
neg. log perplexity -1.561 / -1.553 / -1.554 at CF 1.0 / 1.25 / 2.0 (top-1), -1.572 / -1.559 /
-1.547 (top-2); 1000 / 910 / 860 and 860 / 790 / 840 examples/s. Here: 8 experts, top-1 and top-2
at train CF 0.5, 0.75, 1.0, 1.25, 2.0 (eval CF 2.0 throughout), 3 seeds: the fraction dropped
and the step time are the measured claims; NLL differences under ~0.03 nats are within seed noise
at this budget. The paper's step times (the inverse of its examples/s, relative to CF 1.0) are
drawn on the step-time plot.

Measured on the 2-core CPU: 19 min (30 runs, all trained).
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
RUNS = {f'top{k}_cf{cf}': {'model.num_selected_experts': k, 'model.train_capacity_factor': cf}
        for k in (1, 2) for cf in (0.5, 0.75, 1.0, 1.25, 2.0)}
SEEDS = (0, 1, 2)
SCALE = {'base': {'model.num_experts': 128}}
CF, K = 'model.train_capacity_factor', 'model.num_selected_experts'
PLOTS = (
    Panel(x=CF, y='final_nll', series=K, note='Switch Table 1: CF 1.0-1.25 is the sweet spot'),
    Panel(x=CF, y='train_fraction_dropped', series=K),
    Panel(x=CF, y='step_time', series=K, relative_to={CF: 1.0}, relative='ratio',
          paper={'Switch Table 1, top-1': [(1.0, 1.0), (1.25, 1000 / 910), (2.0, 1000 / 860)],
                 'Switch Table 1, top-2': [(1.0, 1.0), (1.25, 860 / 790), (2.0, 860 / 840)]}),
)
CLAIMS = (
    Claim('top-1: CF 1.0 steps faster than CF 2.0', 'step_time', 'top1_cf1.0', 'top1_cf2.0'),
    Claim('top-1: CF 0.5 steps faster than CF 1.0', 'step_time', 'top1_cf0.5', 'top1_cf1.0'),
    Claim('top-1 steps faster than top-2 at CF 1.25', 'step_time', 'top1_cf1.25', 'top2_cf1.25'),
    Claim('top-1: CF 1.25 drops fewer tokens than 1.0', 'train_fraction_dropped', 'top1_cf1.25',
          'top1_cf1.0'),
    Claim('top-1: CF 1.25 better than CF 0.5', 'final_nll', 'top1_cf1.25', 'top1_cf0.5'),
    Claim('top-1: CF 2.0 no better than 1.25 (sweet spot)', 'final_nll', 'top1_cf1.25',
          'top1_cf2.0', no_worse=True),
)
