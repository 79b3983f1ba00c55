"""moejax: sparse Mixture-of-Experts Transformers in JAX/Flax.

Importing moejax (or moejax.models, moejax.train.sampling) never imports TensorFlow: only
moejax.data and the training loop that reads data do.
"""
from moejax import balancing, dispatch, ensemble, intermediates, routers, routing, sharding
from moejax.balancing import balancing_bias_update, update_balancing_biases
from moejax.errors import ConfigError
from moejax.dispatch import EinsumDispatcher, IndicesDispatcher, SortedDispatcher, make_dispatcher
from moejax.experts import ExpertWeights, block_expert_ffn, expert_ffn
from moejax.intermediates import (collect_aux_losses, collect_decisions, collect_router_probs,
                                  collect_routing_metrics, per_layer_metrics)
from moejax.layer import MoeLayer, fine_grained
from moejax.models import DecoderLM, EncoderDecoder, ModelConfig, make_model, per_token_flops
from moejax.routers import (CosineRouterLogits, DistanceRouterLogits, RouterLogits,
                            gumbel_straight_through, hash_logits)
from moejax.routing import (RoutingDecision, dense_routing, expert_capacity,
                            experts_choose_routing, load_balancing_loss, router_z_loss,
                            top_k_routing)
from moejax.soft_moe import SoftMoeLayer
from moejax.upcycle import upcycle_optimizer_state, upcycle_tree

__all__ = [
    'balancing', 'dispatch', 'ensemble', 'intermediates', 'routers', 'routing', 'sharding',
    'ConfigError', 'CosineRouterLogits', 'DecoderLM', 'DistanceRouterLogits', 'EinsumDispatcher',
    'EncoderDecoder', 'ExpertWeights', 'IndicesDispatcher', 'ModelConfig', 'MoeLayer',
    'RouterLogits', 'RoutingDecision', 'SoftMoeLayer', 'SortedDispatcher',
    'balancing_bias_update', 'block_expert_ffn', 'collect_aux_losses', 'collect_decisions',
    'collect_router_probs', 'collect_routing_metrics', 'dense_routing', 'expert_capacity',
    'expert_ffn', 'experts_choose_routing', 'fine_grained', 'gumbel_straight_through', 'hash_logits',
    'load_balancing_loss', 'make_dispatcher', 'make_model', 'per_layer_metrics',
    'per_token_flops', 'router_z_loss', 'top_k_routing', 'update_balancing_biases',
    'upcycle_optimizer_state', 'upcycle_tree',
]
