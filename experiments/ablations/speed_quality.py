"""Switch vs its FLOP-matched dense twin at equal wall-clock time (Switch Transformer Fig. 5).

Claim: for a fixed training time, the sparse model wins: Switch-Base with 64 experts reaches
T5-Base's quality in about 1/7 of the time. Here: top-1 Switch with 8 experts against its dense
twin, 3 seeds (the gap at our scale is about 0.02 nats), evaluated every 25 steps on the first
4 validation batches (32k tokens); the plot puts validation NLL against training time (steps x
the run's median step time: compilation and evaluation left out) and against steps. Read the
speed-up off it: the time the dense twin needs for a loss the Switch model reached earlier.

Measured on the 2-core CPU: 4 min (6 runs, all trained).
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
RUNS = {'switch': {}, 'dense': {'model.dense_baseline': True}}
SEEDS = (0, 1, 2)
SCALE = {'small': {'eval.every_steps': 25, 'eval.max_batches': 4},
         'base': {'model.num_experts': 64, 'eval.every_steps': 5_000}}
PLOTS = (
    Panel(curve=True, x='seconds', y='nll', title='validation loss vs training time',
          note='Switch Fig. 5: Switch-Base 64e reaches T5-Base quality in ~1/7 of the time'),
    Panel(curve=True, x='step', y='nll', title='validation loss vs steps'),
)
CLAIMS = (
    Claim('Switch is ahead at equal training time', 'nll', 'switch', 'dense', at_equal_time=True),
    Claim('Switch is ahead at equal steps', 'final_nll', 'switch', 'dense'),
)
