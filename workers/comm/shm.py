"""Same-host allreduce through shared memory, used by the TCP backend when every rank can map it.

Each rank owns a shared segment with two window buffers. Per window, every rank
copies its slice in, then reduces its own share of the window straight out of
all the others' buffers, then copies the reduced shares back out: one memory
copy in and one out per byte instead of two kernel copies per hop on the ring.
Buffers alternate between windows, so two barriers per window suffice. Ranks
that cannot map each other's segments (other hosts, other IPC namespaces, a
full /dev/shm) fall back to the socket ring; all ranks agree on the choice.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory

import numpy as np

HEADER = 64  # segment name (48 bytes) + token (16 bytes), exchanged to prove the mapping works
WINDOW_BYTES = 4 << 20


class SharedWindows:
    def __init__(
        self,
        own: shared_memory.SharedMemory,
        peers: list[shared_memory.SharedMemory],
        rank: int,
        window_bytes: int,
    ) -> None:
        self.own = own
        self.segments = peers  # index = rank; peers[rank] is `own`
        self.rank = rank
        self.window_bytes = window_bytes
        self.windows_done = 0  # alternates the buffer across calls, so a late reader is never overwritten

    @staticmethod
    def create(window_bytes: int) -> tuple[shared_memory.SharedMemory, bytes]:
        """This rank's segment, and the 64-byte record that lets peers find and verify it."""
        own = shared_memory.SharedMemory(
            create=True,
            size=HEADER + 2 * window_bytes,
            name=f"nd{os.getpid()}_{secrets.token_hex(6)}",
        )
        token = secrets.token_bytes(16)
        _view(own)[48:64] = token
        name = own.name.lstrip("/").encode()
        return own, name.ljust(48, b"\0") + token

    @staticmethod
    def attach(
        records: np.ndarray, rank: int, own: shared_memory.SharedMemory
    ) -> list[shared_memory.SharedMemory] | None:
        """Map every peer's segment and check its token; None if any cannot be mapped."""
        segments: list[shared_memory.SharedMemory] = []
        try:
            for peer, record in enumerate(records):
                raw = record.tobytes()
                if peer == rank:
                    segments.append(own)
                    continue
                segment = shared_memory.SharedMemory(name=raw[:48].rstrip(b"\0").decode())
                # Python 3.11 registers attached segments for deletion at exit; the owner unlinks them.
                # (Python 3.13's SharedMemory(track=False) would make this unnecessary.)
                tracked = segment._name  # type: ignore[attr-defined]  # private: the name the tracker registered
                resource_tracker.unregister(tracked, "shared_memory")
                segments.append(segment)
                if bytes(_view(segment)[48:64]) != raw[48:64]:
                    raise OSError("token mismatch: a different segment of the same name")
        except (OSError, ValueError):
            for segment in segments:
                if segment is not own:
                    segment.close()
            return None
        return segments

    def buffer(self, peer: int, which: int, dtype: np.dtype, count: int) -> np.ndarray:
        return np.frombuffer(
            _view(self.segments[peer]),
            dtype=dtype,
            count=count,
            offset=HEADER + which * self.window_bytes,
        )

    def allreduce(self, flat: np.ndarray, ufunc: np.ufunc, size: int, sync: Callable[[], None]) -> None:
        """Reduce `flat` in place across the `size` ranks; `sync` is a barrier among them."""
        per_window = max(1, self.window_bytes // flat.itemsize)
        for start in range(0, flat.size, per_window):
            piece = flat[start : start + per_window]
            which = self.windows_done % 2
            self.windows_done += 1
            np.copyto(self.buffer(self.rank, which, flat.dtype, piece.size), piece)
            sync()
            bounds = [piece.size * i // size for i in range(size + 1)]
            lo, hi = bounds[self.rank], bounds[self.rank + 1]
            mine = self.buffer(self.rank, which, flat.dtype, piece.size)[lo:hi]
            for peer in range(size):
                if peer != self.rank:
                    ufunc(mine, self.buffer(peer, which, flat.dtype, piece.size)[lo:hi], out=mine)
            sync()
            for peer in range(size):
                a, b = bounds[peer], bounds[peer + 1]
                piece[a:b] = self.buffer(peer, which, flat.dtype, piece.size)[a:b]

    def close(self) -> None:
        for segment in self.segments:
            segment.close()


def _view(segment: shared_memory.SharedMemory) -> memoryview:
    """The segment's memory (None only once the segment is closed)."""
    if segment.buf is None:
        raise OSError(f"shared memory segment {segment.name} is already closed")
    return segment.buf
