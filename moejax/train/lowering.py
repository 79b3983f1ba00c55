"""`moejax lower`: a config's train step lowered for a platform and a mesh, neither compiled nor
run: whether a TPU or GPU config lowers, and what its devices exchange, checked on a CPU host.

A mesh of N devices is lowered on N simulated CPU devices. XLA reads how many when JAX first
touches a device, so `simulate_devices` asks for them before anything does (the command reads
its config, sets the flag, then checks the config against the devices); in a process that has
already started JAX with fewer, `check_devices` says so in one line.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from moejax import hlo, platforms
from moejax import sharding as moe_sharding
from moejax.errors import ConfigError
from moejax.train.run import Run, plan_run
from moejax.train.step import jit_train_step

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


class LoweringError(Exception):
  """The program does not lower for the platform (a primitive without a rule there, say)."""


def mesh_size(config: ml_collections.ConfigDict) -> int:
  return config.mesh.data * config.mesh.expert * config.mesh.model


def simulate_devices(count: int) -> None:
  """Ask XLA:CPU for `count` devices (XLA_FLAGS); effective if JAX has not touched a device."""
  flags = re.sub(rf'{DEVICE_COUNT_FLAG}=\d+', '', os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = f'{flags} {DEVICE_COUNT_FLAG}={count}'.strip()


def check_devices(count: int) -> None:
  if jax.device_count() < count:
    raise ConfigError('data', count, f'the mesh has {count} devices and this process '
                      f'{jax.device_count()}: JAX started before it could ask for more; run '
                      f'it in a new process or set XLA_FLAGS={DEVICE_COUNT_FLAG}={count}', 'mesh')


def lower_train_step(config: ml_collections.ConfigDict,
                     platform: str) -> tuple[jax.stages.Lowered, Run, Any]:
  """(the train step lowered for `platform`, the run, the train state's shapes and shardings)
  of a checked `config`. Raises LoweringError naming the platform and the cause."""
  run = plan_run(config)
  state = run.abstract_state()
  batch = _abstract_batch(run, config.train.batch_size)
  step = jit_train_step(run.model, run.tx, config.train.load_balancing_loss_coef,
                        config.train.router_z_loss_coef, run.mesh, run.shardings(state))
  try:
    with jax.set_mesh(run.mesh) if run.mesh is not None else contextlib.nullcontext():
      return platforms.lower(step, state, batch, platform=platform), run, state
  except Exception as error:  # whatever lowering raised, named in one line
    cause = str(error).strip().splitlines()[0] if str(error).strip() else ''
    raise LoweringError(f'the train step does not lower for {platform}: '
                        f'{type(error).__name__}: {cause}') from error


def _abstract_batch(run: Run, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """A train batch's shapes and dtypes, split over ('data', 'expert') on the run's mesh."""
  where = (None if run.mesh is None else moe_sharding.batch_sharding(run.mesh))
  return {name: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=where)
          for name, value in jax.eval_shape(lambda: run.example_batch(batch_size)).items()}


def exchange_bytes(collectives: list[hlo.Collective]) -> int:
  """Bytes per step the MoE exchange (all-to-alls, ragged or not) moves off its devices."""
  return sum(c.bytes_per_step for c in collectives
             if c.kind in ('all_to_all', 'ragged_all_to_all'))


def report(lowered: jax.stages.Lowered, run: Run, state: Any, platform: str,
           num_arrays: int = 8) -> str:
  """The collectives with their bytes per step, and the largest arrays of the train state."""
  cfg = run.config
  header = (f'train step lowered for {platform} on a mesh data={cfg.mesh.data} x '
            f'expert={cfg.mesh.expert} x model={cfg.mesh.model} ({mesh_size(cfg)} devices), '
            f'{cfg.model.dtype}, batch {cfg.train.batch_size} x {cfg.data.length}')
  found = hlo.collectives(hlo.module(lowered))
  return '\n'.join([header, '', *_collective_lines(found, run.mesh), '',
                    *_array_lines(state, num_arrays)])


def _collective_lines(found: list[hlo.Collective], mesh) -> list[str]:
  lines = ["collectives per step, as the program states them (the MoE layers' shard_map); the "
           'partitioner adds',
           'those of arrays sharded outside it (the gradient reduction over data) when it '
           'compiles:',
           f'  {"op":<18} {"over":<16} {"operand per device":<22} {"runs":>5} '
           f'{"bytes/step":>14}']
  for c in found:
    if c.group_size > 1:
      lines.append(f'  {c.kind:<18} {_axes(c, mesh):<16} {c.operand:<22} {c.calls:>5} '
                   f'{c.bytes_per_step:>14,}')
  alone = sum(c.calls for c in found if c.group_size == 1)
  if alone:
    lines.append(f'  and {alone} over one device each (an axis of size 1: nothing moves)')
  total = exchange_bytes(found)
  at_most = ', at most' if any(c.kind == 'ragged_all_to_all' for c in found) else ''
  lines.append(f'  exchange (all-to-all) off its devices: {total:,} bytes/step '
               f'({total / 2**20:.2f} MiB){at_most}')
  return lines


def _array_lines(state: Any, count: int) -> list[str]:
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  named = [(jax.tree_util.keystr(path, simple=True, separator='/'), leaf)
           for path, leaf in leaves]
  largest = sorted(named, key=lambda item: -_device_bytes(item[1]))[:count]
  lines = [f'largest arrays of the train state (of {len(named)}), per device:']
  for name, array in largest:
    lines.append(f'  {name:<48} {array.dtype.name}{list(array.shape)!s:<16} '
                 f'{_spec(array):<22} {_device_bytes(array):>12,}')
  total = sum(_device_bytes(leaf) for _, leaf in named)
  lines.append(f'  train state per device: {total:,} bytes ({total / 2**20:.2f} MiB)')
  return lines


def _axes(collective: hlo.Collective, mesh) -> str:
  """The mesh axes whose devices form the collective's replica groups ('expert', 'data x
  expert')."""
  positions = np.arange(mesh.size).reshape(mesh.devices.shape)  # logical device ids
  wanted = {frozenset(group) for group in collective.replica_groups}
  names = [name for name in mesh.axis_names if mesh.shape[name] > 1]
  for size in range(1, len(names) + 1):
    for axes in itertools.combinations(names, size):
      moved = np.moveaxis(positions, [mesh.axis_names.index(a) for a in axes],
                          range(-len(axes), 0))
      groups = moved.reshape(-1, int(np.prod([mesh.shape[a] for a in axes])))
      if {frozenset(row.tolist()) for row in groups} == wanted:
        return ' x '.join(axes)
  return f'{len(collective.replica_groups)} groups of {collective.group_size}'


def _device_bytes(array: jax.ShapeDtypeStruct) -> int:
  """Bytes of the array's shard on one device."""
  return int(np.prod(array.sharding.shard_shape(array.shape))) * array.dtype.itemsize


def _spec(array: jax.ShapeDtypeStruct) -> str:
  spec = getattr(array.sharding, 'spec', None)
  return 'replicated' if spec is None or not any(spec) else str(tuple(spec))
