"""Selective precision: a float32 router in a bfloat16 model (Switch Transformer Table 2).

Claim: a bfloat16 model with a float32 router is as good as float32 and as fast as bfloat16;
an all-bfloat16 model diverges. Switch-Base (32 experts): float32 -1.718 at 1160 examples/s,
bfloat16 -3.780 (diverged), selective precision -1.716 at 1390 examples/s. Here: float32,
bfloat16 with a float32 router and all bfloat16, at the default learning rate (3e-3: the
float32 vs selective-precision claim is about a tiny difference) and at a stressed one (3e-2,
10x: the stability claim; chosen before any run, not tuned), 3 seeds each. On this CPU
bfloat16 is not faster than float32: the speed claim is for accelerators.

Estimated time on the 2-core CPU: 12 runs, about 26 min.
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
PRECISIONS = {'float32': ('float32', 'float32'), 'bf16_f32_router': ('bfloat16', 'float32'),
              'bf16': ('bfloat16', 'bfloat16')}
RUNS = {name: {'model.dtype': dtype, 'model.router_dtype': router}
        for name, (dtype, router) in PRECISIONS.items()}
RUNS |= {f'{name}_lr3e-2': {**overrides, 'train.learning_rate': 3e-2}
         for name, overrides in RUNS.items()}
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
)
