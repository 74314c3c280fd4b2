"""Which keys are split by rows across the shards, and how their rows map onto the parts.

The placement rule itself is in nanodist.client.sharding; this is the client's
bookkeeping of it: splits it decided when creating a key, and splits it found
in other clients' keys through ListKeys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nanodist.client.ps_values import SparseGradient, Values
from nanodist.client.sharding import parse_part, part_name, row_ranges, shard_of
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec


@dataclass(frozen=True)
class Part:
    """One part of a split key: its own key on the wire, and the rows [first, end) it holds."""

    key: str
    first: int
    end: int


@dataclass(frozen=True)
class Split:
    """A key split by rows: its parts (part i on shard i) and the whole array's shape and dtype."""

    parts: list[Part]
    shape: tuple[int, ...]
    dtype: np.dtype


class SplitKeys:
    """The split keys one client knows of, for `shards` shards; keys of at least `split_bytes` are split."""

    def __init__(self, shards: int, split_bytes: int) -> None:
        self.shards = shards
        self.split_bytes = split_bytes
        self.splits: dict[str, Split] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.splits

    def __bool__(self) -> bool:
        return bool(self.splits)

    def get(self, key: str) -> Split | None:
        return self.splits.get(key)

    def shard_index(self, key: str) -> int:
        """The shard of a wire key: part i of a split key lives on shard i, other keys on their hash."""
        part = parse_part(key)
        if part is not None and part[2] == self.shards:
            return part[1]
        return shard_of(key, self.shards)

    def plan(self, key: str, value: np.ndarray) -> None:
        """Split a key being created if it is large enough and has at least a row per shard."""
        n = self.shards
        if n < 2 or not self.split_bytes or value.nbytes < self.split_bytes or value.ndim == 0 or len(value) < n:
            return
        parts = [Part(part_name(key, i, n), a, b) for i, (a, b) in enumerate(row_ranges(len(value), n))]
        self.splits[key] = Split(parts, value.shape, codec.as_wire_array(value).dtype)

    def dense(self, key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The (wire key, array) pairs of a dense value: the key itself, or its parts' rows."""
        split = self.splits.get(key)
        if split is None:
            return [(key, value)]
        if value.shape != split.shape:
            raise ValueError(f"{key!r} has shape {split.shape}, got {value.shape}")
        return [(part.key, value[part.first : part.end]) for part in split.parts]

    def sparse(self, key: str, grad: SparseGradient) -> list[tuple[str, SparseGradient]]:
        """The (wire key, rows) pairs of a sparse gradient; parts that get no row are left out."""
        split = self.splits.get(key)
        if split is None:
            return [(key, grad)]
        rows = np.asarray(grad.rows, dtype=np.int64)
        out = []
        for part in split.parts:
            mask = (rows >= part.first) & (rows < part.end)
            if mask.any():
                out.append((part.key, SparseGradient(rows[mask] - part.first, grad.values[mask])))
        return out

    def buffer(self, key: str, into: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The whole array for a split key (`into` if it fits, else an empty one), and each part's slice
        of it (streamed parts land there)."""
        split = self.splits[key]
        if into is not None and into.shape == split.shape and into.dtype == split.dtype and into.flags.c_contiguous:
            whole = into
        else:
            whole = np.empty(split.shape, dtype=split.dtype)
        return whole, {part.key: whole[part.first : part.end] for part in split.parts}

    def join(self, key: str, values: Values, whole: np.ndarray) -> None:
        """Replace a split key's parts in `values` by the whole array and its lowest version."""
        parts = self.splits[key].parts
        version = min(values.versions[part.key] for part in parts)
        for part in parts:
            piece = values.pop(part.key)
            if not np.shares_memory(piece, whole):  # small parts come unstreamed, as their own arrays
                whole[part.first : part.end] = piece
            del values.versions[part.key]
        values[key] = whole
        values.versions[key] = version

    def learn(self, infos: Iterable[ps.KeyInfo]) -> None:
        """Find the keys split by other clients: a key with all `<key>:part<i>of<n>` parts present."""
        found: dict[str, dict[int, ps.KeyInfo]] = {}
        for info in infos:
            part = parse_part(info.key)
            if part is not None and part[2] == self.shards:
                found.setdefault(part[0], {})[part[1]] = info
        for key, parts in found.items():
            if len(parts) != self.shards or key in self.splits:
                continue
            infos_in_order = [parts[i] for i in range(self.shards)]
            bounds = np.cumsum([0, *(info.shape[0] for info in infos_in_order)])
            self.splits[key] = Split(
                [Part(info.key, int(bounds[i]), int(bounds[i + 1])) for i, info in enumerate(infos_in_order)],
                (int(bounds[-1]), *infos_in_order[0].shape[1:]),
                codec.numpy_dtype(infos_in_order[0].dtype),
            )
