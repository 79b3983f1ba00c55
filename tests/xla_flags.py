"""XLA_FLAGS of every process the tests start: conftest's, with a chosen number of CPU devices.
Imports nothing heavy, so a worker script can call it before it imports jax."""
import os
import re

DEVICE_COUNT = '--xla_force_host_platform_device_count'


def xla_flags(devices: int) -> str:
  """This process's XLA_FLAGS with `devices` CPU devices in place of any device count."""
  flags = re.sub(rf'{DEVICE_COUNT}=\d+', '', os.environ.get('XLA_FLAGS', '')).split()
  return ' '.join([*flags, f'{DEVICE_COUNT}={devices}'])
