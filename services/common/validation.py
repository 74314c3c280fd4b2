"""Bounds on every name, size and count a request may carry."""

from __future__ import annotations

import re

from nanodist.services.common.errors import invalid

MAX_NAME_LENGTH = 256
_NAME = re.compile(r"[A-Za-z0-9_.:/\-]+")


def check_name(name: str, field: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A key, barrier, lock or member name: 1..max_length characters of [A-Za-z0-9_.:/-]."""
    if not name:
        raise invalid(f"{field}: must not be empty")
    if len(name) > max_length:
        raise invalid(f"{field}: {len(name)} characters, at most {max_length} allowed")
    if not _NAME.fullmatch(name):
        raise invalid(f"{field}: {name[:40]!r} may only use letters, digits and _.:/-")
    return name


def check_range(value: int | float, field: str, low: float, high: float) -> None:
    if not low <= value <= high:
        raise invalid(f"{field}: {value} is outside [{low}, {high}]")


def check_count(count: int, field: str, limit: int) -> None:
    if count > limit:
        raise invalid(f"{field}: {count} items, at most {limit} allowed")
