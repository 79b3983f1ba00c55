"""Load-balancing loss coefficient alpha (Switch Transformer section 2.2).

Claim: alpha = 1e-2, chosen from a sweep of 1e-1 to 1e-5, balances the load quickly without
hurting the training loss; dropped tokens are typically under 1%. Here: alpha 0, 1e-3, 1e-2,
1e-1 with 8 top-1 experts (train CF 1.25), 8 seeds: usage spread and fraction dropped are the
large effects; "does not hurt the loss" is a claim of not being worse by more than 0.01
nats/byte.

Measured on the 2-core CPU: 9 min (32 runs: 24 trained, 8 copied from routing's top1,
2026-12-06).
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
RUNS = {f'alpha{a:g}': {'train.load_balancing_loss_coef': a} for a in (0.0, 1e-3, 1e-2, 1e-1)}
SEEDS = tuple(range(8))
SCALE = {'base': {'model.num_experts': 128}}
ALPHA = 'train.load_balancing_loss_coef'
PLOTS = (
    Panel(x=ALPHA, y='final_nll'),
    Panel(x=ALPHA, y='usage_cv'),
    Panel(x=ALPHA, y='train_fraction_dropped',
          paper={'Switch 2.2: typically < 1% dropped at alpha 1e-2': [(0.01, 0.01)]}),
)
CLAIMS = (
    Claim('alpha 1e-2 balances the experts', 'usage_cv', 'alpha0.01', 'alpha0'),
    Claim('alpha 1e-2 drops fewer tokens', 'train_fraction_dropped', 'alpha0.01', 'alpha0',
          paper='Switch 2.2: typically < 1% dropped'),
    Claim('alpha 1e-2 does not hurt the loss', 'final_nll', 'alpha0.01', 'alpha0', margin=0.01),
    Claim('alpha 1e-2 no worse than 1e-1', 'final_nll', 'alpha0.01', 'alpha0.1', margin=0.01),
)
