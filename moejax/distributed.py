"""Many processes, one job: a thin wrapper over `jax.distributed` (gloo collectives on CPU).

On a Cloud TPU pod slice, a SLURM or Open MPI GPU cluster, call `initialize()` with no arguments
(JAX finds the coordinator); on CPU hosts, or anywhere auto-detection fails, name them. Call it
once per process, before anything else touches jax devices; then `jax.devices()` lists the devices
of every process and a `moejax.sharding.make_mesh(...)` spans them all.
"""
from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> None:
  """Join the job: process `process_id` of `num_processes`, coordinator at 'host:port'."""
  # Only read by the CPU backend (collectives between CPU processes); harmless elsewhere.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
