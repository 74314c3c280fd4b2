"""The TCP backend's transport: one socket between every pair of ranks, and frames on it.

The mesh is built once, by a handshake that checks each peer belongs to the
same group. Every message is a frame (kind, length). A background sender thread
sends queued frames in order, so a rank receives and reduces while its sends
are in flight. A rank that fails sends an ABORT frame naming the cause to its
peers, so that every rank raises a CommError naming the same culprit instead of
blaming its neighbour.
"""

from __future__ import annotations

import queue
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable

import numpy as np

from nanodist.workers.comm.base import CommError, Watch

FRAME = struct.Struct("<B7xQ")  # kind, payload length
HELLO = struct.Struct("<qq")  # group hash, rank
DATA, META_KIND, ABORT, HELLO_KIND, SYNC = 1, 2, 3, 4, 5
DEFAULT_TIMEOUT = 60.0
WATCH_EVERY = 0.5  # seconds a receive waits between two calls of the mesh's watch
ABORT_MESSAGE_BYTES = 4096

# What a frame can carry: raw bytes, or a C-contiguous numpy array sent from (or received into) its memory.
Payload = bytes | bytearray | memoryview | np.ndarray


def byte_view(payload: Payload) -> memoryview:
    """A flat byte view of `payload` without a copy."""
    view = payload.data if isinstance(payload, np.ndarray) else memoryview(payload)
    return view.cast("B")


class _Sender:
    """A thread that sends queued frames in order; errors surface at the next flush()."""

    def __init__(self, describe: Callable[[int, BaseException], str]) -> None:
        self.queue: queue.SimpleQueue[tuple[int, socket.socket, bytes, memoryview] | threading.Event] = (
            queue.SimpleQueue()
        )
        self.error: str | None = None
        self.describe = describe
        self.thread = threading.Thread(target=self._run, name="nanodist-tcp-sender", daemon=True)
        self.thread.start()

    def put(self, peer: int, sock: socket.socket, header: bytes, payload: memoryview) -> None:
        self.queue.put((peer, sock, header, payload))

    def flush(self) -> None:
        done = threading.Event()
        self.queue.put(done)
        done.wait()
        if self.error:
            raise CommError(self.error)

    def stop(self) -> None:
        self.queue.put(threading.Event())  # wakes the thread if idle
        self.error = self.error or "communicator closed"

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            if self.error:
                continue  # drain: after a failure nothing more is sent
            peer, sock, header, payload = item
            try:
                if not payload:
                    sock.sendall(header)
                else:
                    # One syscall for header and data; finish by hand if the kernel took only part.
                    sent = sock.sendmsg([header, payload])
                    if sent < len(header):
                        sock.sendall(header[sent:])
                        sock.sendall(payload)
                    elif sent < len(header) + len(payload):
                        sock.sendall(payload[sent - len(header) :])
            except OSError as exc:
                self.error = self.describe(peer, exc)


class Mesh:
    """Sockets to every other rank of a group of `size`; this one is `rank`."""

    def __init__(
        self, rank: int, size: int, sockets: dict[int, socket.socket], *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.rank, self.size = rank, size
        self.sockets = sockets
        self.timeout = timeout
        self._header = bytearray(FRAME.size)
        for sock in sockets.values():
            sock.settimeout(timeout)
        self._sender = _Sender(self.describe)
        self.watch: Watch | None = None  # consulted while a receive waits (Communicator.watch)
        self.first_job_rank = 0  # the job rank of this group's rank 0, once the job knows it (name_ranks)

    def name(self, rank: int) -> str:
        """A rank of this group as the job's rank, which is what users know."""
        return f"rank {self.first_job_rank + rank}"

    @classmethod
    def connect(
        cls,
        rank: int,
        addresses: list[str],
        listener: socket.socket,
        *,
        group: str = "nanodist",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Mesh:
        """Open a socket to every other rank: connect to higher ranks, accept lower ones."""
        size = len(addresses)
        deadline = time.monotonic() + timeout
        sockets: dict[int, socket.socket] = {}
        hello = FRAME.pack(HELLO_KIND, HELLO.size) + HELLO.pack(_group_hash(group), rank)
        try:
            for peer in range(rank + 1, size):
                sock = _dial(
                    addresses[peer],
                    deadline,
                    f"rank {rank}: cannot reach rank {peer} at {addresses[peer]}",
                )
                sock.sendall(hello)
                sockets[peer] = sock
            listener.settimeout(max(0.1, deadline - time.monotonic()))
            while len(sockets) < size - 1:
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    missing = sorted(set(range(rank)) - set(sockets))
                    raise CommError(f"rank {rank}: ranks {missing} did not connect within {timeout:g}s") from None
                _tune(sock)
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                header = _recv_exact(sock, FRAME.size + HELLO.size)
                kind, _ = FRAME.unpack_from(header)
                group_hash, peer = HELLO.unpack_from(header, FRAME.size)
                if kind != HELLO_KIND or group_hash != _group_hash(group) or not 0 <= peer < rank:
                    sock.close()  # a stray connection, or another group's: ignore it
                    continue
                sockets[peer] = sock
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        finally:
            listener.close()
        return cls(rank, size, sockets, timeout=timeout)

    def describe(self, peer: int, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"{self.name(self.rank)}: {self.name(peer)} sent nothing for {self.timeout:g}s (hung, or too slow)"
        return f"{self.name(self.rank)}: lost the connection to {self.name(peer)} ({type(exc).__name__}: the process died?)"

    def send(self, peer: int, kind: int, payload: Payload) -> None:
        """Queue one frame for `peer`; `payload` must stay unchanged until flush() returns."""
        view = byte_view(payload)
        self._sender.put(peer, self.sockets[peer], FRAME.pack(kind, len(view)), view)

    def flush(self) -> None:
        """Return once every queued frame is sent; raises CommError if any send failed."""
        self._sender.flush()

    def recv_frame(self, peer: int, kind: int, payload: Payload) -> None:
        """Receive one frame of `kind` whose payload fills `payload` exactly."""
        self._recv_into(peer, memoryview(self._header))
        got_kind, length = FRAME.unpack(self._header)
        if got_kind == ABORT:
            message = bytearray(min(length, ABORT_MESSAGE_BYTES))
            self._recv_into(peer, memoryview(message))
            raise CommError(message.decode(errors="replace"))
        view = byte_view(payload)
        if got_kind != kind or length != len(view):
            raise CommError(
                f"{self.name(self.rank)}: {self.name(peer)} sent frame kind {got_kind} of {length} bytes where "
                f"kind {kind} of {len(view)} bytes was expected: ranks are out of step"
            )
        self._recv_into(peer, view)

    def _recv_into(self, peer: int, view: memoryview) -> None:
        sock = self.sockets[peer]
        try:
            while view:
                if self.watch is not None:
                    self._await(peer, sock)
                got = sock.recv_into(view)
                if got == 0:
                    raise ConnectionResetError("connection closed")
                view = view[got:]
        except OSError as exc:
            raise CommError(self.describe(peer, exc)) from None

    def _await(self, peer: int, sock: socket.socket) -> None:
        """Return once `sock` has data; in between, every WATCH_EVERY seconds, ask the watch whether the
        group is still whole. Polling, not a shorter socket timeout: that would also cut the sender's
        sends short, mid-frame."""
        waited = 0.0
        readable = select.poll()  # not select.select: a process may hold descriptors past 1024
        readable.register(sock, select.POLLIN)
        while not readable.poll(WATCH_EVERY * 1000):
            waited += WATCH_EVERY
            assert self.watch is not None
            problem = self.watch()
            if problem is not None:
                raise CommError(f"{self.name(self.rank)}: {problem}")
            if waited >= self.timeout:
                raise CommError(self.describe(peer, TimeoutError()))

    def abort(self, message: str) -> None:
        """Tell every peer why this rank stops, then close: nobody is left waiting on us.

        Closing a socket with unread input makes the kernel send RST, which can
        destroy our ABORT frame before the peer reads it; so shut down the
        sending side and drain briefly before closing.
        """
        self._sender.stop()
        # A sender still busy after this is stuck on one peer that does not read (frozen, or cut off):
        # the frames below go to the others, whose sockets it is not writing to.
        self._sender.thread.join(timeout=0.25)
        text = message.encode()[:ABORT_MESSAGE_BYTES]
        frame = FRAME.pack(ABORT, len(text)) + text
        for sock in self.sockets.values():
            try:
                sock.settimeout(0.2)
                sock.sendall(frame)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for sock in self.sockets.values():
            try:
                while time.monotonic() < deadline and sock.recv(1 << 16):
                    pass
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._sender.stop()
        for sock in self.sockets.values():
            sock.close()


def listen(host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    return listener


def _group_hash(group: str) -> int:
    return zlib.crc32(group.encode())


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _dial(address: str, deadline: float, error: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=max(0.1, deadline - time.monotonic()))
            _tune(sock)
            return sock
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise CommError(f"{error}: {exc}") from None
            time.sleep(0.05)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        got = sock.recv(size - len(data))
        if not got:
            raise CommError("peer closed the connection during the handshake")
        data += got
    return bytes(data)
