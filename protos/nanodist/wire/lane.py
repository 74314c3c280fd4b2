"""The tensor lane's frames, shared by the shard and its clients (the protocol is in docs/lane.md).

A lane carries the same PushRequest, PushResponse, PullRequest and PullResponse
bytes as gRPC, so one codec and one set of handlers serve both carriers. What it
saves is gRPC Python's copies: a push is sent from the tensors' own memory
(sendmsg on their views) and received with recv_into a buffer the receiver
keeps; on the local lane the bytes are written once into memory both sides map.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

MAGIC = b"NDLANE1\0"
SECRET_BYTES = 32
# method/status, flags, reserved, timeout in ms (requests), body length
HEADER = struct.Struct("<BBHIQ")
PUSH, PULL, REGION = 1, 2, 3
IN_REGION = 1  # flag: the body is at the start of the shared region, not after the header
OK = 0
# What one sendmsg may take: Linux refuses more than IOV_MAX (1024) pieces.
MAX_PIECES = 1024


class LaneClosed(ConnectionError):
    """The peer closed the connection, or a frame ended early."""


def send_all(sock: socket.socket, pieces: Sequence[bytes | memoryview]) -> None:
    """Send every piece in order, gathered by sendmsg so that no joined copy is made."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    while views:
        sent = sock.sendmsg(views[:MAX_PIECES])
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; LaneClosed if the peer stops before it is full."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise LaneClosed(f"the connection closed after {got} of {len(view)} bytes")
        got += n


def recv_header(sock: socket.socket) -> tuple[int, int, int, int]:
    """(method or status, flags, timeout_ms, length) of the next frame."""
    raw = bytearray(HEADER.size)
    recv_exact(sock, memoryview(raw))
    kind, flags, _, timeout_ms, length = HEADER.unpack(raw)
    return kind, flags, timeout_ms, length


class Buffer:
    """A receive buffer kept from frame to frame: a fresh one would fault in every page of a large body."""

    def __init__(self) -> None:
        self._memory = bytearray()

    def take(self, size: int) -> memoryview:
        if len(self._memory) < size:
            self._memory = bytearray(size)
        return memoryview(self._memory)[:size]
