"""ConfigError: a bad setting, named by its owner and field, with what would be valid.

Layers raise it as `MoeLayer.top_p=0.0 is invalid: ...`; a config that builds a layer re-raises it
under its own name (`model.top_p=0.0 is invalid: ...`), so the message names what the user typed.
"""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """`owner.field=value is invalid: reason.`"""

  def __init__(self, field: str, value: Any, reason: str, owner: str = 'MoeLayer'):
    self.field, self.value, self.reason, self.owner = field, value, reason, owner
    super().__init__(f'{owner}.{field}={value!r} is invalid: {reason}.')
