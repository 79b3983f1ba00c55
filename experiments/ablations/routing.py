"""Routing algorithms, each beside its FLOP-matched dense twin (Switch Table 1, GShard, ST-MoE).

Claims: top-2 is a little better per step than top-1 at equal capacity factor (ST-MoE Table 8:
by 0.003-0.006) but costs more per step (Switch Table 1); GShard's random routing sends the
second choice only with probability 2 x its weight; experts-choose routing (Zhou et al. 2022)
balances the load by construction but sees later tokens, so only an encoder may use it. Here, 8
experts: in the decoder LM, top-1 and top-2 (tokens choose) and top-2 with random routing, with
dense twins of width F and 2F; in the T5 encoder-decoder (4 + 4 blocks, span corruption: its
NLL is per target token, not comparable with the LM's), top-2 and experts-choose (2 experts per
token on average: capacity factor 1.0 in training and evaluation) in the encoder, with the 2F
twin (the decoder routes top-2 in both). 8 seeds. The T5 claims need a T5-Base-sized model
trained far longer: here they are "not testable" (their numbers are still shown).

Measured on the 2-core CPU: 37 min (64 runs, all trained, 2026-12-06, with other work running).
"""
from moejax.ablate import Claim, Panel, Scale

BASE = 'experiments/configs/switch_tiny.py'
TOP2 = {'model.num_selected_experts': 2}
T5 = {'task': 'span_corruption', 'model.kind': 'encoder_decoder'}
RUNS = {
    'top1': {},
    'top1_dense': {'model.dense_baseline': True},
    'top2': TOP2,
    'top2_random': {**TOP2, 'model.random_routing': True},
    'top2_dense': {**TOP2, 'model.dense_baseline': True},
    't5_top2': {**T5, **TOP2},
    't5_experts_choose': {**T5, **TOP2, 'model.routing': 'experts_choose',
                          'model.train_capacity_factor': 1.0, 'model.eval_capacity_factor': 1.0},
    't5_dense': {**T5, **TOP2, 'model.dense_baseline': True},
}
SEEDS = tuple(range(8))
SCALE = {'base': {'model.num_experts': 128}}
PLOTS = (
    Panel(x='run', y='final_nll', series='task'),
    Panel(x='run', y='step_time', series='task'),
    Panel(x='run', y='usage_cv', series='task'),
)
TABLE = ('final_nll', 'train_fraction_dropped', 'eval_fraction_dropped', 'usage_cv',
         'step_time', 'mflops_per_token', 'params')
T5_SCALE = Scale(params=100_000_000, steps=100_000,
                 why='T5-Base-sized encoder-decoders on C4 (Switch Fig. 4, ST-MoE); after 200 '
                     'steps of 1 MB our encoder-decoder has barely begun span corruption')
CLAIMS = (
    Claim('top-1 beats its dense twin', 'final_nll', 'top1', 'top1_dense'),
    Claim('top-2 beats its dense twin', 'final_nll', 'top2', 'top2_dense'),
    Claim('top-2 beats top-1 per step', 'final_nll', 'top2', 'top1',
          paper='ST-MoE Table 8: by 0.003-0.006',
          paper_relative=0.004 / 1.373),  # train CF 1.25, eval CF 2.0: as ours
    Claim('top-1 steps faster than top-2', 'step_time', 'top1', 'top2',
          paper='Switch Table 1: 910 vs 790 ex/s (CF 1.25)', paper_relative=1 - 790 / 910),
    Claim('random routing costs nothing', 'final_nll', 'top2_random', 'top2', margin=0.01,
          paper='GShard'),
    Claim('experts-choose beats top-2 in the encoder', 'final_nll', 't5_experts_choose',
          't5_top2', needs=T5_SCALE, post_hoc='the T5 runs'),
    Claim('T5: top-2 beats its dense twin', 'final_nll', 't5_top2', 't5_dense', needs=T5_SCALE,
          post_hoc='the T5 runs'),
    Claim('T5: experts-choose beats the dense twin', 'final_nll', 't5_experts_choose', 't5_dense',
          needs=T5_SCALE, post_hoc='the T5 runs'),
)
