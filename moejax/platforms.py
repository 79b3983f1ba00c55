"""The platform a program is built for, and lowering a program for any platform from any host.

JAX traces a function once and lowers the trace for a platform: on a CPU host,
`lower(jax.jit(f), *args, platform='tpu')` gives the program a TPU would run, without one.
moejax picks code by platform in two ways:
  - a few ops that differ (the ragged exchange and its CPU emulation, `moejax.exchange`) are
    staged out for every platform with `jax.lax.platform_dependent`; lowering keeps the branch of
    the platform it lowers for;
  - whole paths (`dispatch='auto'`, `moejax.dispatch.auto_dispatch`) are picked while tracing, by
    `target_platform()`: the platform of `building_for` (which `lower` sets), else this host's
    backend. Tracing every path of every layer, as `platform_dependent` would, costs a trace of
    each and, under a gradient, a forward pass that returns the residuals of every path.
The context of `building_for` is part of JAX's trace cache key (`jax.make_user_context`): a
function traced for one platform is traced again for another.
"""
from __future__ import annotations

from typing import Any, ContextManager

import jax

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')

_TARGET = jax.make_user_context(None)


def target_platform() -> str:
  """The platform being traced for: 'cpu', 'cuda', 'rocm' or 'tpu' from `building_for`, else
  `jax.default_backend()` ('gpu' for either GPU)."""
  return _TARGET.value or jax.default_backend()


def building_for(platform: str) -> ContextManager:
  """Trace for `platform` (one of PLATFORMS) within this context."""
  if platform not in PLATFORMS:
    raise ValueError(f'platform {platform!r} is not one of {PLATFORMS}')
  return _TARGET(platform)


def lower(fn: Any, *args, platform: str) -> jax.stages.Lowered:
  """A jitted `fn` traced on `args` (arrays or `jax.ShapeDtypeStruct`s) for `platform` and
  lowered for it: the program that platform compiles, from any host."""
  with building_for(platform):
    return fn.trace(*args).lower(lowering_platforms=(platform,))
