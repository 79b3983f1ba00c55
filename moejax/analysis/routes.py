"""Each token's routing in each MoE layer of a model, read from the decisions the layers sow."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax.balancing import BIAS_COLLECTION
from moejax.intermediates import DECISIONS, collect_decisions, collect_router_probs
from moejax.models import ModelConfig, make_model


@dataclasses.dataclass
class LayerRouting:
  """One MoE layer's routing of T tokens, in text order (NumPy).

  expert: [T, K] int, the chosen experts, best first (expert[:, 0] is the first choice).
  weight: [T, K] float, their combine weights (0 where dropped).
  chosen: [T, K] bool, the router picked this choice (false for a random-routing second choice
    that was not kept, or beyond top-p).
  dispatched: [T, K] bool, chosen and within capacity.
  probs: [T, E] float, the router probabilities.
  """
  expert: np.ndarray
  weight: np.ndarray
  chosen: np.ndarray
  dispatched: np.ndarray
  probs: np.ndarray

  @property
  def num_experts(self) -> int:
    return self.probs.shape[-1]

  @property
  def first_choice(self) -> np.ndarray:
    """[T] int: each token's first-choice expert."""
    return self.expert[:, 0]


def with_eval_capacity(config: ModelConfig, factor: float | None) -> ModelConfig:
  """The model config evaluated at capacity factor `factor` (None: dropless)."""
  return dataclasses.replace(config, eval_capacity_factor=factor)


def token_rows(token_ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """ids [T] -> (rows [B, length], mask [B, length]): consecutive runs of the text, the last one
  padded (id 0, mask False)."""
  num_rows = -(-len(token_ids) // length)
  rows = np.zeros(num_rows * length, np.int32)
  rows[:len(token_ids)] = token_ids
  mask = np.arange(num_rows * length) < len(token_ids)
  return rows.reshape(num_rows, length), mask.reshape(num_rows, length)


def route_tokens(config: ModelConfig, params, token_ids: np.ndarray, length: int,
                 bias_state=None) -> dict[str, LayerRouting]:
  """{layer name: LayerRouting} of every MoE layer for a text of token ids [T], evaluated as
  evaluation does (deterministic, the config's eval capacity factor) in rows of `length` tokens.

  Token-choice routing only (the default 'tokens_choose' routing, any router): with experts
  choosing, or Soft MoE, tokens have no first choice. An encoder-decoder reads the text in both
  stacks (as the encoder's inputs and the decoder's).
  """
  if config.routing != 'tokens_choose' or config.soft_moe:
    raise ValueError('routing analysis reads token-choice decisions; this model has '
                     f'model.routing={config.routing!r}, model.soft_moe={config.soft_moe!r}')
  rows, mask = token_rows(np.asarray(token_ids), length)
  model = make_model(config)
  variables = {'params': params}
  if bias_state is not None:
    variables[BIAS_COLLECTION] = bias_state
  inputs = (rows, mask) if config.kind == 'decoder' else (rows, mask, rows, mask)

  @jax.jit
  def decisions(variables, inputs):
    _, state = model.apply(variables, *inputs, True, mutable=[DECISIONS])
    return collect_decisions(state), collect_router_probs(state)

  decided, probs = decisions(variables, tuple(map(jnp.asarray, inputs)))
  real = mask.reshape(-1)
  flat = lambda a: np.asarray(a).reshape(real.size, -1)[real]  # [G, S, X] -> [T, X]
  return {name: LayerRouting(expert=flat(d.expert_index), weight=flat(d.weight),
                             chosen=flat(d.chosen), dispatched=flat(d.dispatched),
                             probs=flat(probs[name]))
          for name, d in decided.items()}
