"""XLA_FLAGS of every process the tests start: conftest's, with a chosen number of CPU devices.
Imports nothing heavy, so a worker script can call it before it imports jax.

The tests compile CPU code at LLVM optimization level 1, not XLA's default 3: compiling is about
half of what the suite spends, and level 1 cuts a compile-bound file's CPU time by about 14%
(tests/test_layer.py). Every equivalence holds to its tolerance at level 1 as at level 3; level 0
would not (its tanh rounds differently from program to program, 7e-5 apart). They also use XLA's
older CPU fusion emitters (`--xla_cpu_use_fusion_emitters=false`), which compile each fusion
faster: tests/test_layer.py's fast tier took 53 s of CPU time with them, 72 s without (one
process, interleaved), and `make test` 1,309 s against 1,728 s (fresh clones, idle); the
suite passes whole with them. Only the CPU backend's code generation changes: the HLO programs
and their fusions are the same (the older emitters leave a lone elementwise op unwrapped, where
the newer wrap it in a fusion of its own), and the lowerings for 'tpu' and 'cuda' are untouched.
What runs outside the tests (`make run`, sweeps, benchmarks) keeps XLA's defaults: there the
programs are larger and run for many steps, and the older emitters lose on both counts (the
switch_tiny train step at level 1: 13-15 s to its first step against 11-12 s, then 614-626 ms a
step against 371-384 ms), while the tests' small programs gain even where they train
(tests/test_train.py: 86 s of CPU time with them, 108 s without).

    xla_flags(8)  # '... --xla_force_host_platform_device_count=8
                  #  --xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false'
"""
import os
import re

DEVICE_COUNT = '--xla_force_host_platform_device_count'
OPT_LEVEL = '--xla_backend_optimization_level'
FUSION_EMITTERS = '--xla_cpu_use_fusion_emitters'


def xla_flags(devices: int) -> str:
  """This process's XLA_FLAGS with `devices` CPU devices, level 1 and the older fusion emitters
  in place of any given."""
  flags = re.sub(rf'({DEVICE_COUNT}|{OPT_LEVEL}|{FUSION_EMITTERS})=\w+', '',
                 os.environ.get('XLA_FLAGS', '')).split()
  return ' '.join([*flags, f'{DEVICE_COUNT}={devices}', f'{OPT_LEVEL}=1',
                   f'{FUSION_EMITTERS}=false'])
