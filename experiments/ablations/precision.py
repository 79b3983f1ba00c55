"""Selective precision: a float32 router in a bfloat16 model (Switch Transformer Table 2).

Claim: a bfloat16 model with a float32 router is as good as float32 and as fast as bfloat16;
an all-bfloat16 model diverges. Switch-Base (32 experts): float32 -1.718 at 1160 examples/s,
bfloat16 -3.780 (diverged), selective precision -1.716 at 1390 examples/s. Here: float32,
bfloat16 with a float32 router and all bfloat16, at the default learning rate (3e-3: the
float32 vs selective-precision claim is about a tiny difference) and at stressed ones (3e-2,
10x: the stability claim, chosen before any run; 1e-1 added after nothing diverged at 3e-2),
3 seeds each. The speed claim is for accelerators and is not judged here: on this CPU the
step times of runs trained minutes apart differ by 10-20%, and the float32 runs at 3e-3 may be
copies of another sweep's runs.

Measured on the 2-core CPU: 14 min (27 runs: 24 trained, 3 copied from another sweep's identical
runs).
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
PRECISIONS = {'float32': ('float32', 'float32'), 'bf16_f32_router': ('bfloat16', 'float32'),
              'bf16': ('bfloat16', 'bfloat16')}
STRESSED_LRS = {'lr3e-2': 3e-2, 'lr1e-1': 1e-1}
RUNS = {name: {'model.dtype': dtype, 'model.router_dtype': router}
        for name, (dtype, router) in PRECISIONS.items()}
RUNS |= {f'{name}_{lr_name}': {**overrides, 'train.learning_rate': lr}
         for lr_name, lr in STRESSED_LRS.items() for name, overrides in RUNS.items()}
SEEDS = (0, 1, 2)
SCALE = {'base': {'model.num_experts': 32}}
PLOTS = (
    Panel(x='run', y='final_nll', series='train.learning_rate',
          note='Switch Table 2: float32 -1.718, bfloat16 -3.780 (diverged),\n'
               'bfloat16 + float32 router -1.716'),
    Panel(x='run', y='max_router_logit', series='train.learning_rate'),
    Panel(x='run', y='step_time', series='train.learning_rate'),
)
CLAIMS = (
    Claim('selective precision as good as float32', 'final_nll', 'bf16_f32_router', 'float32',
          no_worse=True),
    Claim('a float32 router beats a bfloat16 one', 'final_nll', 'bf16_f32_router', 'bf16'),
    Claim('the same at lr 3e-2', 'final_nll', 'bf16_f32_router_lr3e-2', 'bf16_lr3e-2'),
    Claim('the same at lr 1e-1', 'final_nll', 'bf16_f32_router_lr1e-1', 'bf16_lr1e-1'),
)
