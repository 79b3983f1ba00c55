"""Where the train state and the batches live on a ('data', 'expert', 'model') mesh.

One small rule set, to be replaced by `moejax.sharding`'s partition rules once they exist:
expert weights [..., E, D, F] / [..., E, F, D] are split over 'expert' along E (a leading scan
axis, if any, stays whole), every other array is replicated, and batches are split along B over
('data', 'expert').
"""
from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'expert', 'model')
EXPERT_WEIGHTS = ('wi', 'wi_gate', 'wo')


def make_mesh(data: int = 1, expert: int = 1, model: int = 1) -> Mesh:
  """A mesh over the first data * expert * model devices, axes in auto (GSPMD) mode."""
  return jax.make_mesh((data, expert, model), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=jax.devices()[:data * expert * model])


def _spec(path: tuple, leaf: Any) -> P:
  names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  if 'experts' in names and names[-1] in EXPERT_WEIGHTS:
    return P(*([None] * (leaf.ndim - 3)), 'expert', None, None)
  return P()


def state_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for any tree holding params (the train state, its optimizer moments too)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, _spec(path, leaf)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches [B, ...] split along B over ('data', 'expert')."""
  return NamedSharding(mesh, P(('data', 'expert')))
