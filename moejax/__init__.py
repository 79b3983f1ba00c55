"""moejax: sparse Mixture-of-Experts Transformers in JAX/Flax."""
from moejax.dispatch import EinsumDispatcher, IndicesDispatcher, make_dispatcher
from moejax.experts import ExpertWeights, expert_ffn
from moejax.layer import (MoeLayer, SoftMoeLayer, collect_aux_losses, collect_routing_metrics,
                          fine_grained, update_balancing_biases)
from moejax import ensemble, sharding
from moejax.models import DecoderLM, EncoderDecoder, ModelConfig, make_model, per_token_flops
from moejax.routing import (CosineRouterLogits, DistanceRouterLogits, RouterLogits,
                            RoutingDecision, balancing_bias_update, dense_routing,
                            expert_capacity, experts_choose_routing, gumbel_straight_through,
                            hash_logits, load_balancing_loss, router_z_loss, top_k_routing)
from moejax.upcycle import upcycle_optimizer_state, upcycle_tree

__all__ = [
    'CosineRouterLogits', 'DecoderLM', 'DistanceRouterLogits', 'EinsumDispatcher',
    'EncoderDecoder', 'ExpertWeights', 'IndicesDispatcher', 'ModelConfig', 'MoeLayer',
    'RouterLogits', 'RoutingDecision', 'SoftMoeLayer', 'balancing_bias_update',
    'collect_aux_losses', 'collect_routing_metrics', 'dense_routing', 'expert_capacity',
    'expert_ffn', 'experts_choose_routing', 'fine_grained', 'gumbel_straight_through',
    'hash_logits', 'load_balancing_loss', 'make_dispatcher', 'make_model', 'per_token_flops',
    'router_z_loss', 'top_k_routing', 'update_balancing_biases', 'upcycle_optimizer_state',
    'upcycle_tree',
]
