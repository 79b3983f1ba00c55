"""Switch vs its FLOP-matched dense twin at equal wall-clock time (Switch Transformer Fig. 5).

Claim: for a fixed training time, the sparse model wins: Switch-Base with 64 experts reaches
T5-Base's quality in about 1/7 of the time. Here: top-1 Switch with 8 experts against its dense
twin, 8 seeds, 2,000 steps, evaluated every 100 steps on the first 8 validation batches (64k
tokens); the plot puts validation NLL against training time (steps x the run's step time timed
round-robin in one process, speed_quality_step_times.csv: compilation and evaluation left out)
and against steps. The claims: ahead at equal steps, ahead at equal time, and sooner to 1.9
nats/byte.

Measured on the 2-core CPU: 84 min for 8 seeds at 2,000 steps (16 runs, 2026-12-06; 5.5 min a
run beside another sweep, 3.2 min alone).
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
RUNS = {'switch': {}, 'dense': {'model.dense_baseline': True}}
SEEDS = tuple(range(8))
SCALE = {'small': {'train.num_steps': 2_000, 'checkpoint.every_steps': 500,
                   'eval.every_steps': 100, 'eval.max_batches': 8},
         'base': {'model.num_experts': 64, 'eval.every_steps': 5_000}}
PLOTS = (
    Panel(curve=True, x='seconds', y='nll', title='validation loss vs training time',
          note='Switch Fig. 5: Switch-Base 64e reaches T5-Base quality in ~1/7 of the time'),
    Panel(curve=True, x='step', y='nll', title='validation loss vs steps'),
)
CLAIMS = (
    Claim('Switch is ahead at equal steps', 'final_nll', 'switch', 'dense'),
    Claim('Switch is ahead at equal training time', 'nll_at_equal_time', 'switch', 'dense'),
    Claim('Switch reaches the target sooner', 'time_to_target', 'switch', 'dense', target=1.9,
          paper='Switch Fig. 5: T5-Base quality in ~1/7 of the time', paper_relative=6 / 7),
)
