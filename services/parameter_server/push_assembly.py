"""PushStream assembly: the messages of one stream gathered into a single push.

A client streams a gradient larger than one gRPC message as slices of a dense
entry, in order. Each slice is copied into a full-size buffer for its key; the
buffers come from (and go back to) the key's slot, so a steady stream of
large pushes does not allocate one per push. Sparse entries pass through.
"""

from __future__ import annotations

import numpy as np

from nanodist.services.common.errors import invalid
from nanodist.services.common.validation import check_name
from nanodist.services.parameter_server.store import Slot, Store
from nanodist.wire import codec

SPARE_BUFFERS = 2  # assembly buffers a slot keeps for reuse


class PushAssembly:
    """One PushStream in progress. The first message's header (ids, step, token) stands for the push."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.header: codec.PushMessage | None = None
        self.sparse: list[codec.Entry] = []
        self.dense: dict[str, tuple[np.ndarray, int, Slot]] = {}  # key -> (buffer, elements filled, slot)

    def add(self, message: codec.PushMessage) -> None:
        if self.header is None:
            self.header = message
        for entry in message.entries:
            if entry.rows is not None:
                self.sparse.append(entry)
            else:
                self._add_slice(entry)

    def _add_slice(self, entry: codec.Entry) -> None:
        """Copy one streamed slice into the key's buffer; slices must arrive in order."""
        check_name(entry.key, "entries.key")
        if entry.dense is None:
            raise invalid(f"PushStream: entry for {entry.key!r} has no gradient")
        known = self.dense.get(entry.key)
        if known is None:
            slot = self.store.slot(entry.key, "entries.key")
            buffer = slot.spare.pop() if slot.spare else np.empty(slot.value.size, dtype=slot.value.dtype)
            filled = 0
        else:
            buffer, filled, slot = known
        piece = entry.dense.reshape(-1)
        if piece.dtype != buffer.dtype:
            raise invalid(
                f"PushStream: {entry.key!r} slice dtype {piece.dtype.name} differs from the key's {buffer.dtype.name}"
            )
        if entry.offset != filled or filled + piece.size > buffer.size:
            raise invalid(
                f"PushStream: {entry.key!r} slice at offset {entry.offset} with "
                f"{piece.size} elements does not continue at {filled} of {buffer.size}"
            )
        buffer[filled : filled + piece.size] = piece
        self.dense[entry.key] = (buffer, filled + piece.size, slot)

    def message(self) -> codec.PushMessage:
        """The whole push, once the stream has ended; every dense key must be complete."""
        if self.header is None:
            raise invalid("PushStream: the stream carried no messages")
        entries = list(self.sparse)
        for key, (buffer, filled, slot) in self.dense.items():
            if filled != buffer.size:
                raise invalid(f"PushStream: key {key!r} got {filled} of {buffer.size} elements")
            entries.append(codec.Entry(key=key, dense=buffer.reshape(slot.value.shape)))
        self.header.entries = entries
        return self.header

    def release(self) -> None:
        """Give the buffers back to their slots (the store copies or applies a push before it returns)."""
        for buffer, _, slot in self.dense.values():
            if len(slot.spare) < SPARE_BUFFERS and buffer.size == slot.value.size:
                slot.spare.append(buffer)
        self.dense.clear()
