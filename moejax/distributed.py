"""Many processes, one job: a thin wrapper over `jax.distributed` (gloo collectives on CPU).

On a Cloud TPU pod slice, a SLURM or Open MPI GPU cluster, call `initialize()` with no arguments
(JAX finds the coordinator); on CPU hosts, or anywhere auto-detection fails, name them. Call it
once per process, before anything else touches jax devices; then `jax.devices()` lists the devices
of every process and a `moejax.sharding.make_mesh(...)` spans them all.

`moejax train | eval | sample` call `initialize_from(...)`: explicit --coordinator /
--num_processes / --process_id flags (or MOEJAX_COORDINATOR, MOEJAX_NUM_PROCESSES,
MOEJAX_PROCESS_ID), else a detected multi-process launch (SLURM or Open MPI with more than one
task, a multi-host TPU slice), else one process.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from moejax.errors import InputError


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> None:
  """Join the job: process `process_id` of `num_processes`, coordinator at 'host:port'."""
  # Only read by the CPU backend (collectives between CPU processes); harmless elsewhere.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)


def launched_as_many() -> bool:
  """Whether the environment says this is one of several processes that JAX can find itself."""
  env = os.environ
  tasks = max(int(env.get('SLURM_NTASKS') or 1), int(env.get('OMPI_COMM_WORLD_SIZE') or 1))
  return tasks > 1 or ',' in env.get('TPU_WORKER_HOSTNAMES', '')


def initialize_from(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None) -> bool:
  """Initialize jax.distributed when launched as one of several processes (explicit arguments,
  the MOEJAX_* variables, or a detected cluster launch); returns whether it did."""
  env = os.environ
  coordinator = coordinator or env.get('MOEJAX_COORDINATOR')
  if coordinator:
    num_processes = num_processes or int(env.get('MOEJAX_NUM_PROCESSES', '0')) or None
    process_id = process_id if process_id is not None else env.get('MOEJAX_PROCESS_ID')
    if num_processes is None or process_id is None:
      raise ValueError('a coordinator needs --num_processes and --process_id (or '
                       'MOEJAX_NUM_PROCESSES and MOEJAX_PROCESS_ID)')
    initialize(coordinator, num_processes, int(process_id))
    return True
  if launched_as_many():
    initialize()
    return True
  return False


def broadcast_json(value: Any) -> Any:
  """Process 0's `value` (anything JSON can hold) on every process: what one process decided
  (a lock taken, checksums verified) is what all act on. One process: `value` itself."""
  if jax.process_count() == 1:
    return value
  lead = jax.process_index() == 0
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if lead else None
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size if lead else 0)))
  buffer = data if lead else np.zeros(size, np.uint8)
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def on_lead(work: Callable[[], Any], what: str) -> Any:
  """Run `work` on process 0 alone (preparing a dataset, training a vocabulary: one writer, no
  race) and return its result (anything JSON can hold) on every process once it is done. When it
  fails, process 0 raises its error and every other process an InputError with its message."""
  if jax.process_count() == 1:
    return work()
  outcome, failure = None, None
  if jax.process_index() == 0:
    try:
      outcome = {'value': work()}
    except BaseException as error:  # broadcast first, so the others do not wait forever
      outcome, failure = {'error': str(error)}, error
  outcome = broadcast_json(outcome)
  if failure is not None:
    raise failure
  if 'error' in outcome:
    raise InputError(f'process 0 could not {what}: {outcome["error"]}')
  return outcome['value']
