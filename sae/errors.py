"""User-facing errors and the small checks that raise them (a leaf module: imports nothing of ours).

A `ConfigError` names a config field and what it expected; a `DataError` names a data file and its
problem. The command-line tools print either as one line and exit with status 2.
"""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the field and what was expected."""


class DataError(ValueError):
    """A user's data cannot be used; the message names the file (or config field) and the problem."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def positive(value: float | None, key: str) -> None:
    """`key=value` must be a positive finite number."""
    require(value is not None and value > 0 and math.isfinite(value), f"{key}={value} must be a positive number")


def fraction(value: float, key: str) -> None:
    """`key=value` must lie in [0, 1]."""
    require(0 <= value <= 1, f"{key}={value} must be a fraction in [0, 1]")
