"""The arithmetic of a BSP step's sum: its accumulator, reused from step to step, and the sum's narrowing
to the key's dtype. Separate from the store, which decides when a step completes."""

from __future__ import annotations

import ml_dtypes
import numpy as np

HALF_PRECISION = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def step_total(value: np.ndarray, last: np.ndarray | None, zeroed: bool) -> np.ndarray:
    """A BSP step's sum for a key holding `value`: the last step's sum if there is one (a fresh one faults
    in every page). Half-precision keys sum in float32, which is both exact enough and fast: numpy's
    float16 arithmetic has no SIMD."""
    total = last
    if total is None:
        total = np.empty(value.shape, dtype=np.float32 if value.dtype in HALF_PRECISION else value.dtype)
    if zeroed:
        total.fill(0)
    return total


def narrowed(value: np.ndarray, spare: list[np.ndarray], total: np.ndarray, scale: float) -> np.ndarray:
    """A float32 sum as the dtype of the key holding `value`, already scaled (optimizers work on same-dtype
    arrays). `spare` keeps the key's narrow buffers from one step to the next."""
    np.multiply(total, scale, out=total)
    narrow = spare.pop() if spare else np.empty(value.size, dtype=value.dtype)
    np.copyto(narrow, total.reshape(-1), casting="same_kind")
    if len(spare) < 2:
        spare.append(narrow)  # the optimizer is done with it before the next push arrives
    return narrow.reshape(value.shape)


def no_rows() -> np.ndarray:
    return np.empty(0, dtype=np.int64)


def summed_rows(rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows and their gradients, duplicates summed (a batch may touch a row many times)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    if len(unique) == len(rows):
        return rows, values
    summed = np.zeros((len(unique), values.shape[1]), dtype=values.dtype)
    np.add.at(summed, inverse, values)
    return unique, summed
