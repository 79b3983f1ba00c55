"""Fine-grained experts and shared-expert isolation (DeepSeekMoE, Dai et al. 2024, arXiv:2401.06066).

Claim: at equal expert parameters and FLOPs per token, splitting each expert into m smaller ones
and choosing m times as many (more combinations of specialists) lowers the loss, and isolating a
shared expert that every token goes through, carved from the routed budget, lowers it further.
DeepSeekMoE section 4.3 and Fig. 3 (a 2B-parameter model on 100B tokens, GShard top-2 of 16 as
the baseline): each step, shared-expert isolation and then finer segmentation, improves the
benchmarks at the same cost.

Here: top-2 of 8 experts of width F = 256 (m = 1), `fine_grained(8, 256, 2, m)` for m = 2 (top-4
of 16, width 128) and m = 4 (top-8 of 32, width 64), and m = 4 with one shared expert of width 64
taken from the routed budget (top-7 of 31 routed plus the shared one: the same 32 experts'
parameters and 8 experts' FLOPs per token). 8 seeds at the CPU scale (200 steps). The runs set
the widths from the CPU scale's F = 256 at every scale (`--scale base` keeps them; give
--config.model.ffn_dim per run for T5-Base widths).

Measured on the 2-core CPU: 8 min for the first 18 of its 32 runs, alone (2026-12-07, about
30 s a run, so about 16 min for all 32); the other 14 took 70 min beside test suites.
"""
from moejax.ablate import Claim, Panel

BASE = 'experiments/configs/switch_tiny.py'


def segmented(m: int, shared: int = 0) -> dict:
  """fine_grained(8, 256, 2, m) as config overrides, `shared` of its experts isolated."""
  return {'model.num_experts': 8 * m - shared, 'model.ffn_dim': 256 // m,
          'model.num_selected_experts': 2 * m - shared, 'model.num_shared_experts': shared,
          'model.dense_ffn_dim': 256}  # the dense blocks' FFNs keep their width


RUNS = {'m1': segmented(1), 'm2': segmented(2), 'm4': segmented(4),
        'm4_shared1': segmented(4, shared=1)}
SEEDS = tuple(range(8))
SCALE = {}
PLOTS = (
    Panel(x='run', y='final_nll'),
    Panel(x='run', y='usage_cv'),
    Panel(x='run', y='step_time'),
)
TABLE = ('final_nll', 'train_fraction_dropped', 'usage_cv', 'max_vio', 'step_time',
         'mflops_per_token', 'params')
CLAIMS = (
    Claim('fine-grained m = 2 beats m = 1', 'final_nll', 'm2', 'm1',
          paper='DeepSeekMoE Fig. 3: finer segmentation helps at equal cost'),
    Claim('fine-grained m = 4 beats m = 1', 'final_nll', 'm4', 'm1'),
    Claim('a shared expert beats fine-grained alone (m = 4)', 'final_nll', 'm4_shared1', 'm4',
          paper='DeepSeekMoE Fig. 3: shared-expert isolation helps'),
)
