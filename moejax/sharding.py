"""Meshes, partition rules, and the all-to-all exchange that puts experts on different devices.

Mesh axes: 'data' and 'expert' both split the batch (tokens); 'expert' also splits the experts;
'model' splits each expert's hidden width F (Megatron-style: one psum after the second matmul).

  mesh = moejax.sharding.make_mesh(data=2, expert=4)        # 8 devices
  params = moejax.sharding.shard_params(variables, mesh)     # experts split on their E axis
  batch = moejax.sharding.shard_batch(local_batch, mesh)     # batch over ('data', 'expert')
  with jax.set_mesh(mesh):
    y = jax.jit(model.apply)(params, batch)                  # MoE layers run expert-parallel

Inside a MoE layer each device routes its own groups and fills buffers [E, G_local, C, D]; one
all-to-all over 'expert' sends each expert's slice to the device that owns it, giving
[E / n_expert, n_expert * G_local, C, D]; the local experts run; a second all-to-all sends the
results back, and each device combines its own tokens.

Parameters are plain arrays (no metadata boxes), so a MoeLayer drops into any Flax model and any
`nn.scan`. Their logical axis names come from their path: `logical_axes(tree)` names the axes of
every moejax parameter in any tree (a whole model's params, a scanned stack's, an optimizer state
mirroring them), and `param_specs` maps the names to mesh axes by `LOGICAL_AXIS_RULES`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'expert', 'model')
BATCH_AXES = ('data', 'expert')
# Flax logical axis name -> mesh axes. Users with their own meshes pass `logical_axes(params)` and
# their own rules to `nn.logical_to_mesh`. 'layers' names the leading axes nn.scan adds.
LOGICAL_AXIS_RULES = (('batch', BATCH_AXES), ('expert', 'expert'), ('mlp', 'model'),
                      ('embed', None), ('layers', None))
# Logical axes of a MoeLayer's parameters, by the end of their path. The routed experts' E axis is
# 'expert'; shared experts ('shared_experts') are held whole by every device.
PARAM_AXES = {
    ('experts', 'wi'): ('expert', 'embed', 'mlp'),
    ('experts', 'wi_gate'): ('expert', 'embed', 'mlp'),
    ('experts', 'wo'): ('expert', 'mlp', 'embed'),
    ('experts', 'bi'): ('expert', 'mlp'),
    ('experts', 'bi_gate'): ('expert', 'mlp'),
    ('experts', 'bo'): ('expert', 'embed'),
    ('shared_experts', 'wi'): (None, 'embed', 'mlp'),
    ('shared_experts', 'wi_gate'): (None, 'embed', 'mlp'),
    ('shared_experts', 'wo'): (None, 'mlp', 'embed'),
    ('shared_experts', 'bi'): (None, 'mlp'),
    ('shared_experts', 'bi_gate'): (None, 'mlp'),
    ('shared_experts', 'bo'): (None, 'embed'),
    ('router', 'dense', 'kernel'): ('embed', None),
    ('router', 'projection', 'kernel'): ('embed', None),
    ('router', 'centroids'): (None, 'embed'),
}
EXPERT_WEIGHT_AXES = {name[-1]: axes for name, axes in PARAM_AXES.items() if name[0] == 'experts'}


def make_mesh(data: int = -1, expert: int = 1, model: int = 1,
              devices: list | None = None) -> Mesh:
  """A ('data', 'expert', 'model') mesh over `devices` (default: all); one size may be -1."""
  devices = jax.devices() if devices is None else devices
  sizes = {'data': data, 'expert': expert, 'model': model}
  unknown = [name for name, size in sizes.items() if size == -1]
  known = math.prod(size for size in sizes.values() if size != -1)
  if len(unknown) > 1 or any(size < 1 and size != -1 for size in sizes.values()):
    raise ValueError(f'mesh sizes {sizes}: each must be >= 1, and at most one may be -1')
  if unknown:
    if len(devices) % known:
      raise ValueError(f'mesh sizes {sizes}: {len(devices)} devices do not divide by {known}')
    sizes[unknown[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f'mesh sizes {sizes} multiply to {math.prod(sizes.values())}, but there are '
                     f'{len(devices)} devices')
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def active_mesh():
  """The mesh set with `jax.set_mesh` if it is a moejax mesh (has an 'expert' axis), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or tuple(mesh.axis_names) != MESH_AXES:
    return None
  return mesh


def key_name(key) -> Any:
  """The name of one entry of a pytree key path (dict key, attribute or index)."""
  return getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', None)))


def logical_axes(tree) -> Any:
  """A tree like `tree` of logical axis names (a `PartitionSpec` per array): moejax's parameters
  by `PARAM_AXES` (matched on the end of their path), with 'layers' for each extra leading axis a
  scan added; every other array all None (replicated). Works on any model holding MoeLayers, and
  on anything that mirrors its params' paths (optimizer moments)."""
  def names(path, leaf):
    keys = tuple(str(key_name(k)) for k in path)
    ndim = np.ndim(leaf)
    for suffix, axes in PARAM_AXES.items():
      if keys[-len(suffix):] == suffix and ndim >= len(axes):
        return P(*('layers',) * (ndim - len(axes)), *axes)
    return P(*(None,) * ndim)
  return jax.tree_util.tree_map_with_path(names, nn.unbox(tree))


def param_specs(tree) -> Any:
  """PartitionSpecs over the mesh axes for a params (or variables) tree: `logical_axes` mapped
  by `LOGICAL_AXIS_RULES`."""
  return nn.logical_to_mesh(logical_axes(tree), LOGICAL_AXIS_RULES)


def shard_params(variables, mesh: Mesh):
  """`variables` placed on `mesh`: expert weights split on E over 'expert' (and F over 'model'),
  everything else replicated."""
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(variables),
                           is_leaf=lambda x: isinstance(x, P))
  return jax.device_put(nn.unbox(variables), shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'expert'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(local_batch, mesh: Mesh):
  """Global arrays from each process's own rows of the batch (all rows with one process)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of a global batch that this process feeds (for its data loader)."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  starts = [index[0].start or 0 for index in index_map.values()]
  stops = [global_batch_size if index[0].stop is None else index[0].stop
           for index in index_map.values()]
  rows = slice(min(starts), max(stops))
  if sum(stop - start for start, stop in set(zip(starts, stops))) != rows.stop - rows.start:
    raise ValueError(f'this process\'s devices do not hold one contiguous block of the batch on '
                     f'mesh {dict(mesh.shape)}')
  return rows


def check_divisible(num_experts: int, num_groups: int, mesh) -> None:
  """Clear errors when experts or routing groups do not split evenly over `mesh`."""
  expert_shards = mesh.shape['expert']
  batch_shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
  if num_experts % expert_shards:
    raise ValueError(f'MoeLayer.num_experts={num_experts} must be a multiple of the mesh\'s '
                     f'expert axis ({expert_shards}) to place whole experts on each device.')
  if num_groups % batch_shards:
    raise ValueError(f'{num_groups} routing groups (batch * length / group_size) do not divide '
                     f'over the {batch_shards} devices of the mesh axes {BATCH_AXES}: make the '
                     f'batch a multiple of {batch_shards} or change MoeLayer.group_size.')


def to_expert_devices(buffers: jax.Array) -> jax.Array:
  """Inside shard_map: [E, G_local, C, D] -> [E_local, n_expert * G_local, C, D].

  Slice j of the expert axis goes to the j-th device along 'expert', which owns those experts;
  what arrives is stacked along the group axis in device order.
  """
  return jax.lax.all_to_all(buffers, 'expert', split_axis=0, concat_axis=1, tiled=True)


def from_expert_devices(outputs: jax.Array) -> jax.Array:
  """Inside shard_map: the inverse exchange, [E_local, n_expert * G_local, C, D] -> [E, G_local,
  C, D], after summing the partial results of the F slices over 'model'."""
  outputs = jax.lax.psum(outputs, 'model')  # a no-op copy when the model axis has size 1
  return jax.lax.all_to_all(outputs, 'expert', split_axis=1, concat_axis=0, tiled=True)


def once_over_model(weights: dict[str, jax.Array], name: str) -> dict[str, jax.Array]:
  """Inside shard_map: `weights` with weights[name] (if any) zero on every 'model' shard but the
  first, so a term added after the F slices' partial sums is counted once by their psum."""
  if name not in weights:
    return weights
  first = (jax.lax.axis_index('model') == 0).astype(weights[name].dtype)
  return {**weights, name: weights[name] * first}


def device_rng(rng: jax.Array | None) -> jax.Array | None:
  """Inside shard_map: a different key on every device (None stays None)."""
  return None if rng is None else jax.random.fold_in(rng, jax.lax.axis_index(MESH_AXES))


def shard_map_layer(fn: Callable, mesh, weight_names) -> Callable:
  """`fn(tokens, probs, valid, weights, draws, rng) -> (out, decision)` run per device.

  Per-group arrays ([G, ...]: tokens, probs, valid, draws, out and every decision array) are
  split over the batch axes; each expert weight (`weight_names`: those passed) by its logical
  axes; the rng is replicated.
  """
  batch = P(BATCH_AXES)
  weight_specs = {name: P(*nn.logical_to_mesh_axes(EXPERT_WEIGHT_AXES[name], LOGICAL_AXIS_RULES))
                  for name in weight_names}
  return jax.shard_map(fn, mesh=mesh, in_specs=(batch, batch, batch, weight_specs, batch, P()),
                       out_specs=(batch, batch))


_DTYPE_BYTES = {'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 's8': 1, 'pred': 1}


def all_to_all_bytes(compiled_hlo: str) -> int:
  """Bytes one device hands to its all-to-all ops, summed over ops, from compiled HLO text.

  Each device keeps 1 / n of what it hands in (its own slice), so the bytes that leave a device
  are this times (n - 1) / n for an all-to-all over n devices.
  """
  total = 0
  for line in compiled_hlo.splitlines():
    if ' all-to-all(' not in line:
      continue
    result_type = line.split('=', 1)[1].split('all-to-all(')[0]
    for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', result_type):
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total
