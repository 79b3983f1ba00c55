"""Auxiliary-loss-free balancing (Wang et al. 2024, arXiv:2408.15664; DeepSeek-V3, arXiv:2412.19437).

Claim: a per-expert bias, added to the router scores only to pick the experts and moved against
each expert's load after every step (rate u = 1e-3, both papers), balances the load at least as
well as the auxiliary loss and reaches a lower validation loss, because no balancing gradient
interferes with the language-modelling one. Wang et al. Table 2 (MoE decoders of 1B and 3B
parameters, 100B and 200B tokens): loss-free has the lower validation perplexity and a far lower
MaxVio_global than the auxiliary loss; DeepSeek-V3 Table 5 ablates the strategy on a small and a
large MoE model (about 16B and 230B parameters) and finds the loss-free one better on most
benchmarks. Either balancing beats none (routing collapse without it, Wang et al. section 2).

Here: top-2 of 8 experts, and a fine-grained top-8 of 32 (`fine_grained(8, F, 2, 4)`: the same
expert parameters and FLOPs per token), each with the Switch auxiliary loss at 1e-2 and 1e-3,
with the bias (u = 1e-3) and no auxiliary loss, and with neither; the router z-loss (1e-3) stays
on in every run. 8 seeds at the CPU scale (200 steps). MaxVio (`records.max_vio`) is taken over
the last 50 train steps, the fraction dropped at the training capacity factor 1.25.

Measured on the 2-core CPU: 47 min for the 56 runs it trains (2026-12-07; fine8of32_aux1e-2 is
fine_grained's m4, copied): 13 min for top2's three balanced runs alone (about 33 s a run), then
34 min for top2_none and three fine8of32 runs, partly beside a test suite.
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
TOP2 = {'model.num_selected_experts': 2}
# fine_grained(8, 256, 2, 4) at the CPU scale's F = 256: 32 experts of width 64, 8 chosen;
# model.ffn_dim also sets the dense FFNs' width unless dense_ffn_dim does.
FINE = {'model.num_experts': 32, 'model.ffn_dim': 64, 'model.num_selected_experts': 8,
        'model.dense_ffn_dim': 256}  # the dense blocks' FFNs keep their width
BALANCING = {
    'aux1e-2': {'train.load_balancing_loss_coef': 1e-2},
    'aux1e-3': {'train.load_balancing_loss_coef': 1e-3},
    'free': {'train.load_balancing_loss_coef': 0.0, 'model.balancing_bias_rate': 1e-3},
    'none': {'train.load_balancing_loss_coef': 0.0},
}
RUNS = {f'{k}_{name}': {**routing, **balancing}
        for k, routing in (('top2', TOP2), ('fine8of32', FINE))
        for name, balancing in BALANCING.items()}
SEEDS = tuple(range(8))
SCALE = {}
PLOTS = (
    Panel(x='run', y='final_nll', series='model.num_experts'),
    Panel(x='run', y='max_vio', series='model.num_experts'),
    Panel(x='run', y='train_fraction_dropped', series='model.num_experts'),
)
TABLE = ('final_nll', 'max_vio', 'train_fraction_dropped', 'eval_fraction_dropped', 'usage_cv',
         'step_time', 'params')
MAXVIO = 'max load / mean load - 1'
CLAIMS = tuple(
    claim
    for k in ('top2', 'fine8of32')
    for claim in (
        Claim(f'loss-free balances at least as well as aux 1e-2 ({k})', 'max_vio', f'{k}_free',
              f'{k}_aux1e-2', margin=0.05, unit=MAXVIO,
              paper='Wang et al. Table 2: MaxVio_global far lower with loss-free balancing'),
        Claim(f'loss-free drops no more than aux 1e-2 at CF 1.25 ({k})',
              'train_fraction_dropped', f'{k}_free', f'{k}_aux1e-2', margin=0.005),
        Claim(f'loss-free reaches a lower loss than aux 1e-2 ({k})', 'final_nll', f'{k}_free',
              f'{k}_aux1e-2', paper='Wang et al. Table 2: lower validation perplexity'),
        Claim(f'loss-free reaches a lower loss than aux 1e-3 ({k})', 'final_nll', f'{k}_free',
              f'{k}_aux1e-3'),
        Claim(f'loss-free balances better than neither ({k})', 'max_vio', f'{k}_free',
              f'{k}_none', unit=MAXVIO),
        Claim(f'aux 1e-2 balances better than neither ({k})', 'max_vio', f'{k}_aux1e-2',
              f'{k}_none', unit=MAXVIO),
    ))
