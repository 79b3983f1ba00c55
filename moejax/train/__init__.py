"""Training: configs, optimizers, the jit-compiled steps, Orbax checkpoints, metric writers.

These modules do not import TensorFlow. The loop (`moejax.train.loop`: train, evaluate, sample)
reads data through `moejax.data`, which does; import it explicitly.
"""
from moejax.train.checkpoint import Checkpoints, IncompatibleCheckpointError, check_compatible
from moejax.train.config import config_from_file, default_config, model_config, saved_config
from moejax.train.optim import learning_rate_schedule, make_optimizer
from moejax.sharding import batch_sharding, make_mesh
from moejax.train.sharding import param_specs, state_shardings
from moejax.train.inputs import shift_right
from moejax.train.step import (TrainState, cross_entropy, eval_step, init_state, make_eval_step,
                               make_train_step, token_log_probs, train_step)

__all__ = [
    'Checkpoints', 'IncompatibleCheckpointError', 'TrainState', 'batch_sharding', 'check_compatible',
    'config_from_file', 'cross_entropy', 'default_config', 'eval_step', 'init_state',
    'learning_rate_schedule', 'make_eval_step', 'make_mesh', 'make_optimizer', 'make_train_step',
    'model_config', 'param_specs', 'saved_config', 'shift_right', 'state_shardings',
    'token_log_probs', 'train_step',
]
