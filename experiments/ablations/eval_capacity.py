"""Evaluation capacity factor of a model trained at capacity factor 1.0 (ST-MoE Table 8).

Claim: raising only the eval capacity factor helps, most when training capacity is low:
ST-MoE (32 experts), train CF 1.0: neg. log perplexity -1.397 at eval CF 1.0 and -1.384 at 2.0
for top-1 (+0.013), -1.392 and -1.378 for top-2 (+0.014). Here: top-1 and top-2 with 8 experts
trained at CF 1.0, 8 seeds, each checkpoint evaluated at eval CF 1.0, 1.25, 2.0 and dropless
(None): the comparison is paired (the same weights), so seed noise mostly cancels. The plot
shows the NLL change from eval CF 1.0, with the paper's.

Measured on the 2-core CPU: 10 min (16 runs, all trained, and 64 evaluations; 2026-12-06).
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
RUNS = {f'top{k}': {'model.num_selected_experts': k, 'model.train_capacity_factor': 1.0}
        for k in (1, 2)}
SEEDS = tuple(range(8))
EVALS = {'cf1.0': {'model.eval_capacity_factor': 1.0},
         'cf1.25': {'model.eval_capacity_factor': 1.25},
         'cf2.0': {'model.eval_capacity_factor': 2.0},
         'dropless': {'model.eval_capacity_factor': None}}
SCALE = {'base': {'model.num_experts': 32}}
K = 'model.num_selected_experts'
PLOTS = (
    Panel(x='eval', y='final_nll', series=K, relative_to={'model.eval_capacity_factor': 1.0},
          paper={'ST-MoE Table 8, top-1': [('cf1.0', 0.0), ('cf2.0', -0.013)],
                 'ST-MoE Table 8, top-2': [('cf1.0', 0.0), ('cf2.0', -0.014)]}),
    Panel(x='eval', y='eval_fraction_dropped', series=K),
)
TABLE = ('final_nll', 'eval_fraction_dropped', 'usage_cv', 'train_fraction_dropped')
CLAIMS = (
    Claim('top-1: eval CF 2.0 beats eval CF 1.0', 'final_nll', 'top1@cf2.0', 'top1@cf1.0',
          paper='ST-MoE Table 8: -1.384 vs -1.397', paper_relative=0.013 / 1.397),
    Claim('top-2: eval CF 2.0 beats eval CF 1.0', 'final_nll', 'top2@cf2.0', 'top2@cf1.0',
          paper='ST-MoE Table 8: -1.378 vs -1.392', paper_relative=0.014 / 1.392),
    Claim('top-1: dropless beats eval CF 1.0', 'final_nll', 'top1@dropless', 'top1@cf1.0'),
    Claim('top-2: dropless beats eval CF 1.0', 'final_nll', 'top2@dropless', 'top2@cf1.0'),
)
