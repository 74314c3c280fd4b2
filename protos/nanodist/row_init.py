"""The first value of a table row, as RowInitializer in parameter_server.proto defines it.

A row's value depends only on the seed, its global row and the column count,
so that a server can create rows lazily in any order and any client can
compute the same values (a reference model in a test, a script that starts a
local table from the same numbers).
"""

from __future__ import annotations

import numpy as np

NORMAL, UNIFORM, ZEROS = 1, 2, 3  # RowInitializer.Kind; 0 (unset) means NORMAL

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele, Lea and Flood's SplitMix64 finaliser over uint64, wrapping on overflow."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _uniform(counters: np.ndarray, seed: int) -> np.ndarray:
    """u(i) in [0, 1) with 53 random bits, for each counter i."""
    key = splitmix64(np.array([seed], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        bits = splitmix64(counters + key)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def initial_rows(
    rows: np.ndarray, columns: int, *, kind: int = NORMAL, scale: float = 1.0, seed: int = 0, dtype: object = np.float32
) -> np.ndarray:
    """The first values of global `rows` ([len(rows), columns], `dtype`)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out_dtype = np.dtype(dtype)  # type: ignore[call-overload]
    if kind == ZEROS or not len(rows):
        return np.zeros((len(rows), columns), dtype=out_dtype)
    scale = scale or 1.0
    element = rows.astype(np.uint64)[:, None] * np.uint64(columns) + np.arange(columns, dtype=np.uint64)
    counters = element * np.uint64(2)
    if kind == UNIFORM:
        values = scale * (2.0 * _uniform(counters, seed) - 1.0)
    else:
        radius = np.sqrt(-2.0 * np.log1p(-_uniform(counters, seed)))
        values = scale * radius * np.cos(2.0 * np.pi * _uniform(counters + np.uint64(1), seed))
    return values.astype(out_dtype)
