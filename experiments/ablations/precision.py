"""Selective precision: a float32 router in a bfloat16 model (Switch Transformer Table 2).

Claim: a bfloat16 model with a float32 router is as good as float32 and as fast as bfloat16;
an all-bfloat16 model diverges. Switch-Base (32 experts): float32 -1.718 at 1160 examples/s,
bfloat16 -3.780 (diverged), selective precision -1.716 at 1390 examples/s. Here: float32,
bfloat16 with a float32 router and all bfloat16, at the default learning rate (3e-3: the
float32 vs selective-precision claim is about a tiny difference) and at stressed ones (3e-2,
10x: the stability claim, chosen before any run; 1e-1 added after nothing diverged at 3e-2),
8 seeds each. The router claims are about divergence at Switch-Base's scale: "not testable
here", their numbers shown. The speed claim is for accelerators and is not judged here
(bfloat16 is no faster than float32 on this CPU).

Measured on the 2-core CPU: 19 min (72 runs: 48 trained, 24 copied from routing and z_loss;
2026-12-06).
"""
from moejax.ablate import Claim, Panel, Scale

BASE = 'experiments/configs/switch_tiny.py'
PRECISIONS = {'float32': ('float32', 'float32'), 'bf16_f32_router': ('bfloat16', 'float32'),
              'bf16': ('bfloat16', 'bfloat16')}
STRESSED_LRS = {'lr3e-2': 3e-2, 'lr1e-1': 1e-1}
RUNS = {name: {'model.dtype': dtype, 'model.router_dtype': router}
        for name, (dtype, router) in PRECISIONS.items()}
RUNS |= {f'{name}_{lr_name}': {**overrides, 'train.learning_rate': lr}
         for lr_name, lr in STRESSED_LRS.items() for name, overrides in RUNS.items()}
SEEDS = tuple(range(8))
SCALE = {'base': {'model.num_experts': 32}}
PLOTS = (
    Panel(x='run', y='final_nll', series='train.learning_rate',
          note='Switch Table 2: float32 -1.718, bfloat16 -3.780 (diverged),\n'
               'bfloat16 + float32 router -1.716'),
    Panel(x='run', y='max_router_logit', series='train.learning_rate'),
    Panel(x='run', y='step_time', series='train.learning_rate'),
)
BF16_INSTABILITY = Scale(params=100_000_000,
                         why='Switch Table 2: Switch-Base, 32 experts, where a bfloat16 router '
                             'diverges early in training; here none does')
CLAIMS = (
    Claim('selective precision as good as float32', 'final_nll', 'bf16_f32_router', 'float32',
          margin=0.01, paper='Switch Table 2: -1.716 vs -1.718'),
    Claim('a float32 router beats a bfloat16 one', 'final_nll', 'bf16_f32_router', 'bf16',
          needs=BF16_INSTABILITY, paper='Switch Table 2: -1.716 vs -3.780 (diverged)'),
    Claim('the same at lr 3e-2', 'final_nll', 'bf16_f32_router_lr3e-2', 'bf16_lr3e-2',
          needs=BF16_INSTABILITY),
    Claim('the same at lr 1e-1', 'final_nll', 'bf16_f32_router_lr1e-1', 'bf16_lr1e-1',
          needs=BF16_INSTABILITY, post_hoc='the lr 1e-1 runs'),
)
