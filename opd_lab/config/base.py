"""Shared pieces of the config schemas: the error type, the range check, enums used by several groups.

Every schema module here is pure (no torch import). See ``opd_lab/config/__init__.py`` for the whole picture.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """A config value is out of range; the message names the field and the allowed values."""


def _check(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{path}={value!r} is invalid: allowed {allowed}")


class LRSchedule(str, Enum):
    cosine = "cosine"
    constant = "constant"
