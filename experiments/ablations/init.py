"""Initialization scale of the router and the experts (Switch Transformer Table 3).

Claim: a 10x smaller initialization (truncated normal, std sqrt(s / fan_in), s = 0.1 instead of
1.0) improves quality and its spread across runs early in training: Switch-Base (32 experts)
after 3.5k steps, 3 seeds: -2.72 +- 0.01 at 0.1x, -3.60 +- 0.68 at 1.0x. Here: the routers' and
experts' init scale 0.1 vs 1.0 (Switch scaled every weight; moejax's dense layers keep Flax's
defaults), 8 seeds, evaluated every 50 steps: mean +- std of the first evaluation (step 50) and of
the last (step 200). The paper's effect is the 1.0x init's instability at its scale; no run here
is unstable, so the verdicts are "not testable here" (the numbers are still shown).

Measured on the 2-core CPU: 10 min for 8 seeds (16 runs, 2026-12-06; half of them beside
another sweep).
"""
from moejax.ablate import Claim, Panel, Scale

BASE = 'experiments/configs/switch_tiny.py'
RUNS = {f'init{s}': {'model.router_init_scale': s, 'model.init_scale': s} for s in (0.1, 1.0)}
SEEDS = tuple(range(8))
SCALE = {'small': {'eval.every_steps': 50}, 'base': {'model.num_experts': 32}}
PLOTS = (
    Panel(x='run', y='early_nll', title='after 50 steps',
          note='Switch Table 3 (3.5k steps): 0.1x -2.72 +- 0.01, 1.0x -3.60 +- 0.68'),
    Panel(x='run', y='final_nll', title='after 200 steps'),
    Panel(curve=True, x='step', y='nll', title='validation loss, mean +- std over seeds'),
)
TABLE = ('early_nll', 'final_nll', 'max_router_logit', 'usage_cv', 'nonfinite_steps', 'diverged')
INSTABILITY = Scale(params=100_000_000, steps=3_500,
                    why='Switch Table 3: Switch-Base, 32 experts, 3.5k steps, where the 1.0x '
                        'init is unstable (std 0.68 over seeds); here no run is')
CLAIMS = (
    Claim('0.1x init is better early', 'early_nll', 'init0.1', 'init1.0', needs=INSTABILITY,
          paper='Switch Table 3: -2.72 vs -3.60', paper_relative=(3.60 - 2.72) / 3.60),
    Claim('0.1x init is better at the end', 'final_nll', 'init0.1', 'init1.0', needs=INSTABILITY),
)
