"""NANODIST_* environment variables as defaults for flags and constructor arguments."""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T", str, int, float)


def env_default(name: str, default: T) -> T:
    """The value of NANODIST_<NAME> if set, converted to the default's type; else `default`."""
    raw = os.environ.get(f"NANODIST_{name.upper()}")
    return default if raw is None else type(default)(raw)


def env_optional(name: str) -> str | None:
    """The value of NANODIST_<NAME>, or None when it is unset."""
    return os.environ.get(f"NANODIST_{name.upper()}")
