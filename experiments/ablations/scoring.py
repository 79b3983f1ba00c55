"""Sigmoid router scores against softmax scores (DeepSeek-V3, arXiv:2412.19437, section 2.1.2).

Claim: DeepSeek-V3 scores each expert with its own sigmoid (normalized over the chosen experts to
weight them) where DeepSeek-V2 used a softmax over the experts, beside the auxiliary-loss-free
bias; the report gives no ablation of the change. So the claim tested is that it costs nothing:
sigmoid no worse than softmax within 0.01 nats/byte.

Here: top-2 of 8 experts and a fine-grained top-8 of 32 (`fine_grained(8, F, 2, 4)`), each
with softmax and with sigmoid scores, all with DeepSeek-V3's recipe around them: the balancing
bias at u = 1e-3 and no auxiliary loss (the router z-loss 1e-3 stays on), the chosen weights
normalized to sum to 1 (`normalize_weights`). 8 seeds at the CPU scale (200 steps).

Measured on the 2-core CPU: 67 min (2026-12-07): 60 min for the first 23 runs beside test
suites, 7 min for the last 9 alone (about 45 s a run, so about 25 min for all 32 alone).
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'
RECIPE = {'train.load_balancing_loss_coef': 0.0, 'model.balancing_bias_rate': 1e-3,
          'model.normalize_weights': True}
TOP2 = {'model.num_selected_experts': 2}
# fine_grained(8, 256, 2, 4) at the CPU scale's F = 256: 32 experts of width 64, 8 chosen;
# model.ffn_dim also sets the dense FFNs' width unless dense_ffn_dim does.
FINE = {'model.num_experts': 32, 'model.ffn_dim': 64, 'model.num_selected_experts': 8,
        'model.dense_ffn_dim': 256}  # the dense blocks' FFNs keep their width
RUNS = {f'{k}_{score}': {**routing, **RECIPE, 'model.score_function': score}
        for k, routing in (('top2', TOP2), ('fine8of32', FINE))
        for score in ('softmax', 'sigmoid')}
SEEDS = tuple(range(8))
PLOTS = (
    Panel(x='run', y='final_nll', series='model.num_experts'),
    Panel(x='run', y='max_vio', series='model.num_experts'),
)
TABLE = ('final_nll', 'max_vio', 'train_fraction_dropped', 'usage_cv', 'step_time', 'params')
CLAIMS = tuple(
    Claim(f'sigmoid scores no worse than softmax ({k})', 'final_nll', f'{k}_sigmoid',
          f'{k}_softmax', margin=0.01,
          paper='DeepSeek-V3 2.1.2: sigmoid affinities (no ablation reported)')
    for k in ('top2', 'fine8of32'))
