"""Number of experts at equal FLOPs per token (Switch Transformer Fig. 4).

Claim: with the FLOPs per token fixed, more experts (more parameters) give a lower loss at a fixed
number of steps, steadily from 2 to 256 experts; Switch-Base with 64 experts reaches T5-Base's
quality at step 450k by step 60k (7.5x). Here: the FLOP-matched dense twin and top-1 Switch with
E = 2, 4, 8, 16, 32 experts in every other block, 8 seeds, 2,000 steps (3.3 M tokens, about 3.6
epochs of tiny shakespeare): at 200 steps the experts are still warming up. Evaluated every 100
steps on the first 8 validation batches (64k tokens), as speed_quality: its 16 runs are this
sweep's dense and E8, trained once. The papers' losses are not comparable with ours; the plot
carries the claim as a note.

Measured on the 2-core CPU: 32 min for E32's 8 seeds at 2,000 steps (2026-12-06, 3.9 min a run;
dense and E8 are speed_quality's runs); E2, E4 and E16 (24 runs) in three sittings on 2026-12-06
and -07, beside other work (8 min a run for the last E16 seeds with one test job beside them;
about 3.5 min alone).
"""
from moejax.ablate import Claim, Panel, Scale

BASE = 'experiments/configs/switch_tiny.py'
RUNS = {'dense': {'model.dense_baseline': True},
        **{f'E{e}': {'model.num_experts': e} for e in (2, 4, 8, 16, 32)}}
SEEDS = tuple(range(8))
# The gains from more experts grow with training: 2,000 steps (3.3 M tokens), not 200. Evaluated
# as speed_quality's runs are, so its two runs are E8 and dense here (trained once, copied).
SCALE = {'small': {'train.num_steps': 2_000, 'checkpoint.every_steps': 500,
                   'eval.every_steps': 100, 'eval.max_batches': 8}}
PLOTS = (
    Panel(x='params', y='final_nll', log_x=True, title='loss vs parameters at equal FLOPs/token',
          note='Switch Fig. 4: the loss falls steadily with the number of experts\n'
               '(T5-Base 223M -> Switch-Base 256 experts 14.7B parameters)'),
    Panel(curve=True, x='step', y='nll', title='validation loss vs steps'),
)
GROWS = Scale(steps=2_000, why='the gains from experts grow with training (Switch Fig. 4); '
                              'at 200 steps they are warming up')
CLAIMS = (
    Claim('8 experts beat the dense twin', 'final_nll', 'E8', 'dense', needs=GROWS),
    Claim('32 experts beat the dense twin', 'final_nll', 'E32', 'dense', needs=GROWS),
    Claim('more experts, lower loss: 32 vs 2', 'final_nll', 'E32', 'E2', needs=GROWS,
          paper='Switch Fig. 4: steady gains from 2 to 256 experts'),
    Claim('more experts, lower loss: 16 vs 4', 'final_nll', 'E16', 'E4', needs=GROWS),
)
