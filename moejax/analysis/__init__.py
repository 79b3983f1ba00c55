"""Routing analysis: which tokens go to which expert, and does it mean anything?

  routes = route_tokens(model_config, params, token_ids, length)   # {layer: LayerRouting}
  stats.agreement(routes[layer])        # consecutive tokens sharing an expert, against chance
  stats.router_stats(routes[layer])     # entropy, first-choice probability, fraction dropped
  stats.class_usage(routes[layer], *stats.byte_classes(token_ids))   # specialization
  analyze_run('runs/switch_tiny')       # all of it for a trained run: routing.json + figures

`route_tokens` and `moejax.analysis.stats` are NumPy/JAX only; `figures` imports matplotlib and
`analyze_run` the training loop's data pipeline (TensorFlow) when called.
"""
from moejax.analysis import figures, stats
from moejax.analysis.report import analyze_run, write_figures
from moejax.analysis.routes import LayerRouting, route_tokens, token_rows, with_eval_capacity

__all__ = ['LayerRouting', 'analyze_run', 'figures', 'route_tokens', 'stats', 'token_rows',
           'with_eval_capacity', 'write_figures']
