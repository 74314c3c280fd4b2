"""Embedding tables on the parameter servers: one part per shard, rows created as they are pushed.

A table of R rows is always split across all n shards by the rule of
nanodist.client.sharding: part i, named `<table>:part<i>of<n>`, holds rows
[floor(i*R/n), floor((i+1)*R/n)) and lives on shard i. Each part is a key
whose rows the server creates lazily from the table's initializer (see
RowInitializer in parameter_server.proto), so declaring a table costs
nothing and a shard's memory grows with the rows pushed to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nanodist.client.sharding import parse_part, part_name, row_ranges
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec


@dataclass(frozen=True)
class Table:
    name: str
    rows: int
    columns: int
    dtype: np.dtype
    parts: list[str]  # wire key of part i, on shard i
    bounds: np.ndarray  # part i holds rows [bounds[i], bounds[i + 1])

    @classmethod
    def plan(cls, name: str, rows: int, columns: int, dtype: np.dtype, shards: int) -> Table:
        ranges = row_ranges(rows, shards)
        bounds = np.array([a for a, _ in ranges] + [rows], dtype=np.int64)
        return cls(name, rows, columns, dtype, [part_name(name, i, shards) for i in range(shards)], bounds)

    def spec(self, part: int, initializer: ps.RowInitializer, dtype: int) -> ps.TableSpec:
        first, end = int(self.bounds[part]), int(self.bounds[part + 1])
        return ps.TableSpec(
            rows=end - first,
            columns=self.columns,
            dtype=dtype,  # type: ignore[arg-type]
            initializer=initializer,
            first_row=first,
        )

    def check_ids(self, ids: np.ndarray) -> np.ndarray:
        """`ids` as int64 rows, or ValueError naming the table and the first id out of range."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"table {self.name!r}: ids must be integers, got {ids.dtype.name}")
        ids = ids.astype(np.int64, copy=False).reshape(-1)
        bad = (ids < 0) | (ids >= self.rows)
        if bad.any():
            raise ValueError(
                f"table {self.name!r}: id {int(ids[bad][0])} is out of range [0, {self.rows}) "
                f"({int(bad.sum())} of {len(ids)} ids are)"
            )
        return ids

    def split(self, ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(part, rows within the part, positions in `ids`) for every part, empty parts included."""
        part_of = np.searchsorted(self.bounds, ids, side="right") - 1
        order = np.argsort(part_of, kind="stable")
        cuts = np.searchsorted(part_of[order], np.arange(len(self.parts) + 1))
        out = []
        for part in range(len(self.parts)):
            positions = order[cuts[part] : cuts[part + 1]]
            out.append((part, ids[positions] - self.bounds[part], positions))
        return out


def find(name: str, infos: Iterable[ps.KeyInfo], shards: int) -> Table | None:
    """The table `name` among the shards' keys, if all of its parts exist."""
    parts: dict[int, ps.KeyInfo] = {}
    for info in infos:
        part = parse_part(info.key)
        if part is not None and part[0] == name and info.HasField("table"):
            if part[2] != shards:
                raise ValueError(f"table {name!r} was created for {part[2]} shards; this client has {shards}")
            parts[part[1]] = info
    if len(parts) != shards:
        return None
    ordered = [parts[i] for i in range(shards)]
    bounds = np.array([info.table.first_row for info in ordered] + [sum(i.table.rows for i in ordered)])
    first = ordered[0].table
    return Table(name, int(bounds[-1]), first.columns, codec.numpy_dtype(first.dtype), [i.key for i in ordered], bounds)
