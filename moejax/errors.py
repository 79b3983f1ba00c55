"""The errors a user can act on: a bad setting (ConfigError, named by its owner and field, with
what would be valid) and an input that cannot be used (InputError, named by its path).

Layers raise ConfigError as `MoeLayer.top_p=0.0 is invalid: ...`; a config that builds a layer
re-raises it under its own name (`model.top_p=0.0 is invalid: ...`), so the message names what
the user typed. The command line prints either as one line and exits with status 2.
"""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """`owner.field=value is invalid: reason.`"""

  def __init__(self, field: str, value: Any, reason: str, owner: str = 'MoeLayer'):
    self.field, self.value, self.reason, self.owner = field, value, reason, owner
    super().__init__(f'{owner}.{field}={value!r} is invalid: {reason}.')


class InputError(ValueError):
  """A file or directory the user named cannot be used: missing, of the wrong kind (a file where
  a directory is needed, or the reverse), unreadable, broken or empty. The message names it."""
