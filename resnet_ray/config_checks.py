"""The checks every config section runs when it is built: one ConfigError naming the field (a leaf module)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


def check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def choice(value: Any, name: str, allowed: Sequence[str]) -> None:
    check(value in allowed, name, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


def positive(value: float, name: str, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    check(ok and math.isfinite(value), name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
