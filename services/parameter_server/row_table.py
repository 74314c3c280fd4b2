"""A table whose rows exist once pushed: an embedding table that costs memory only for the rows touched.

Rows are stored densely in the order they were created, with a map from a
row's number to its place. A row that was never pushed has its initial value
(nanodist.row_init), which a pull computes without storing, so reading a row
costs no memory. The optimizer's state grows with the rows, and a row a push
does not carry keeps its value and state (lazy, as torch's SparseAdam).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanodist.row_init import initial_rows
from nanodist.services.parameter_server.optimizers import Optimizer, OptimizerConfig

FIRST_CAPACITY = 1024


@dataclass(frozen=True)
class TableShape:
    """What Init declares: rows, columns, dtype and the initializer of every row."""

    rows: int
    columns: int
    dtype: np.dtype
    initializer: int
    scale: float
    seed: int
    first_row: int  # the global row of row 0 (a part of a split table)

    def initial(self, rows: np.ndarray) -> np.ndarray:
        return initial_rows(
            rows + self.first_row,
            self.columns,
            kind=self.initializer,
            scale=self.scale,
            seed=self.seed,
            dtype=self.dtype,
        )


class RowTable:
    def __init__(self, shape: TableShape, optimizer: OptimizerConfig) -> None:
        self.shape = shape
        self.index = RowIndex()  # row -> its place in data
        self.held = 0
        self.ids = np.empty(FIRST_CAPACITY, dtype=np.int64)  # data's rows, in creation order
        self.data = np.empty((FIRST_CAPACITY, shape.columns), dtype=shape.dtype)
        self.optimizer = Optimizer(optimizer, self.data)

    @property
    def row_bytes(self) -> int:
        """Bytes one created row costs: its value and its optimizer state."""
        return self.shape.columns * self.shape.dtype.itemsize * (1 + self.optimizer.config.state_count)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The current values of `rows` (initial values for rows never pushed); creates nothing."""
        found = self._places(rows)
        out = self.data[np.maximum(found, 0)]
        missing = found < 0
        if missing.any():
            out[missing] = self.shape.initial(rows[missing])
        return out

    def new_rows(self, rows: np.ndarray) -> int:
        """How many of the unique `rows` do not exist yet."""
        return int((self._places(rows) < 0).sum())

    def update(self, rows: np.ndarray, grad: np.ndarray, scale: float) -> None:
        """Apply the optimizer to unique `rows`, creating those that do not exist."""
        places = self._create(rows)
        self.optimizer.apply_rows(self.data, places, grad, scale)

    def _places(self, rows: np.ndarray) -> np.ndarray:
        return self.index.find(rows)

    def _create(self, rows: np.ndarray) -> np.ndarray:
        places = self._places(rows)
        missing = np.flatnonzero(places < 0)
        if not len(missing):
            return places
        start = self.held
        self._reserve(start + len(missing))
        self.held += len(missing)
        new = np.arange(start, start + len(missing))
        self.data[new] = self.shape.initial(rows[missing])
        for state in self.optimizer.states:
            state[new] = 0
        self.ids[new] = rows[missing]
        self.index.add(rows[missing], new)
        places[missing] = new
        return places

    def _reserve(self, needed: int) -> None:
        capacity = len(self.ids)
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        self.ids = _grown(self.ids, capacity)
        self.data = _grown(self.data, capacity)
        self.optimizer.states = [_grown(s, capacity) for s in self.optimizer.states]

    def restore(self, ids: np.ndarray, data: np.ndarray, states: list[np.ndarray]) -> None:
        """Take rows from a checkpoint."""
        self._reserve(max(len(ids), 1))
        count = self.held = len(ids)
        self.ids[:count], self.data[:count] = ids, data
        for mine, saved in zip(self.optimizer.states, states, strict=True):
            mine[:count] = saved
        self.index = RowIndex()
        self.index.add(ids, np.arange(count))

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Copies of the rows that exist: their numbers, values and optimizer state."""
        count = self.held
        return self.ids[:count].copy(), self.data[:count].copy(), [s[:count].copy() for s in self.optimizer.states]


def _grown(array: np.ndarray, rows: int) -> np.ndarray:
    grown = np.empty((rows, *array.shape[1:]), dtype=array.dtype)
    grown[: len(array)] = array
    return grown


class RowIndex:
    """Row number -> place, looked up for a whole batch at once: a large sorted level and a small one
    that takes new rows and merges into the large one when it grows past a fraction of it, so that
    lookups are two binary searches and inserts cost O(1) amortised copies per row."""

    def __init__(self) -> None:
        self.levels = [_Level(), _Level()]  # [large, small]

    def find(self, rows: np.ndarray) -> np.ndarray:
        places = np.full(len(rows), -1, dtype=np.int64)
        for level in self.levels:
            level.find(rows, places)
        return places

    def add(self, rows: np.ndarray, places: np.ndarray) -> None:
        large, small = self.levels
        small.merge(rows, places)
        if len(small.rows) > max(4096, len(large.rows) // 8):
            large.merge(small.rows, small.places)
            self.levels[1] = _Level()


class _Level:
    def __init__(self) -> None:
        self.rows = np.empty(0, dtype=np.int64)
        self.places = np.empty(0, dtype=np.int64)

    def find(self, rows: np.ndarray, out: np.ndarray) -> None:
        if not len(self.rows):
            return
        at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        hit = self.rows[at] == rows
        out[hit] = self.places[at[hit]]

    def merge(self, rows: np.ndarray, places: np.ndarray) -> None:
        merged = np.concatenate([self.rows, rows])
        order = np.argsort(merged, kind="stable")
        self.rows, self.places = merged[order], np.concatenate([self.places, places])[order]
