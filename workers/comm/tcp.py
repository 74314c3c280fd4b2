"""TCP backend: a bandwidth-optimal ring allreduce over persistent sockets.

Every pair of ranks shares one socket (a full mesh, built once). A collective
is a schedule of ring steps; each step sends one segment to the right
neighbour and receives another from the left, chunk by chunk. A background
sender thread works through the chunks while the main thread receives and
reduces, so sending, receiving and reducing overlap. Arrays are reduced in
place; the only scratch buffer is one chunk.

Every message is a frame (kind, length). A rank that fails sends an ABORT
frame naming the cause to its peers, so that every rank raises a CommError
naming the same culprit instead of blaming its neighbour.
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable

import numpy as np

from nanodist.wire.codec import numpy_dtype
from nanodist.workers.comm.base import (
    UFUNCS,
    CommError,
    Communicator,
    ReduceOp,
    SendHandle,
    check_array,
    signature,
)
from nanodist.workers.comm.shm import WINDOW_BYTES, SharedWindows

FRAME = struct.Struct("<B7xQ")  # kind, payload length
META = struct.Struct("<qqqqq")  # sequence, opcode, dtype, count, root
HELLO = struct.Struct("<qq")  # group hash, rank
DATA, META_KIND, ABORT, HELLO_KIND, SYNC = 1, 2, 3, 4, 5
OPCODES = {"allreduce": 1, "broadcast": 2, "allgather": 3, "barrier": 4, "send": 5}
CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT = 60.0
SHM_MIN_BYTES = 256 << 10  # below this the socket ring's lower latency wins


class _Sender:
    """A thread that sends queued frames in order; errors surface at the next flush()."""

    def __init__(self, describe: Callable[[int, BaseException], str]) -> None:
        self.queue: queue.SimpleQueue[tuple[int, socket.socket, bytes, memoryview | None] | threading.Event] = (
            queue.SimpleQueue()
        )
        self.error: str | None = None
        self.describe = describe
        self.thread = threading.Thread(target=self._run, name="nanodist-tcp-sender", daemon=True)
        self.thread.start()

    def put(self, peer: int, sock: socket.socket, header: bytes, payload: memoryview | None = None) -> None:
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
                if payload is None:
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


def _group_hash(group: str) -> int:
    import zlib

    return zlib.crc32(group.encode())


class TCPCommunicator(Communicator):
    def __init__(
        self,
        rank: int,
        size: int,
        sockets: dict[int, socket.socket],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.rank, self.size = rank, size
        self.sockets = sockets
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._scratch = bytearray(chunk_bytes)
        self._header = bytearray(FRAME.size)
        self._meta = bytearray(META.size)
        self._seq = 0
        self._broken: str | None = None
        for sock in sockets.values():
            sock.settimeout(timeout)
        self._sender = _Sender(self._describe)
        self._shm: SharedWindows | None = None
        self._shm_state = "untried" if os.environ.get("NANODIST_COMM_SHM", "1") != "0" else "off"
        self._empty = memoryview(b"")

    # --- building the mesh -------------------------------------------------

    @classmethod
    def connect(
        cls,
        rank: int,
        addresses: list[str],
        listener: socket.socket,
        *,
        group: str = "nanodist",
        timeout: float = DEFAULT_TIMEOUT,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> TCPCommunicator:
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
        return cls(rank, size, sockets, timeout=timeout, chunk_bytes=chunk_bytes)

    # --- framing -----------------------------------------------------------

    def _describe(self, peer: int, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"rank {self.rank}: rank {peer} sent nothing for {self.timeout:g}s (hung, or too slow)"
        return f"rank {self.rank}: lost the connection to rank {peer} ({type(exc).__name__}: the process died?)"

    def _recv_into(self, peer: int, view: memoryview) -> None:
        sock = self.sockets[peer]
        try:
            while view:
                got = sock.recv_into(view)
                if got == 0:
                    raise ConnectionResetError("connection closed")
                view = view[got:]
        except OSError as exc:
            raise CommError(self._describe(peer, exc)) from None

    def _recv_frame(self, peer: int, kind: int, payload: memoryview) -> None:
        """Receive one frame of `kind` whose payload fills `payload` exactly."""
        self._recv_into(peer, memoryview(self._header))
        got_kind, length = FRAME.unpack(self._header)
        if got_kind == ABORT:
            message = bytearray(min(length, 4096))
            self._recv_into(peer, memoryview(message))
            raise CommError(message.decode(errors="replace"))
        if got_kind != kind or length != len(payload):
            raise CommError(
                f"rank {self.rank}: rank {peer} sent frame kind {got_kind} of {length} bytes where "
                f"kind {kind} of {len(payload)} bytes was expected: ranks are out of step"
            )
        self._recv_into(peer, payload)

    def _send(self, peer: int, kind: int, payload: memoryview | bytes) -> None:
        view = memoryview(payload).cast("B")
        self._sender.put(peer, self.sockets[peer], FRAME.pack(kind, len(view)), view)

    # --- collectives -------------------------------------------------------

    def _run(self, body: Callable[[], None]) -> None:
        if self._broken:
            raise CommError(f"communicator is unusable after an earlier failure: {self._broken}")
        try:
            body()
            self._sender.flush()
        except CommError as error:
            self._abort(str(error))
            raise

    def _abort(self, message: str) -> None:
        """Tell every peer why this rank stops, then close: nobody is left waiting on us.

        Closing a socket with unread input makes the kernel send RST, which can
        destroy our ABORT frame before the peer reads it; so shut down the
        sending side and drain briefly before closing.
        """
        self._broken = message
        self._sender.stop()
        self._sender.thread.join(timeout=1.0)
        text = message.encode()[:4096]
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

    def _agree(self, name: str, flat: np.ndarray, root: int = 0) -> None:
        """Exchange (sequence, op, dtype, count, root) around the ring; any difference is an error."""
        self._seq += 1
        mine = (self._seq, *signature(flat, OPCODES[name]), root)
        left, right = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        self._send(right, META_KIND, META.pack(*mine))
        self._recv_frame(left, META_KIND, memoryview(self._meta))
        theirs = META.unpack(self._meta)
        if theirs != mine:
            names = ("sequence", "operation", "dtype", "count", "root")
            diffs = [
                f"{n} {_show(n, a)} vs {_show(n, b)}" for n, a, b in zip(names, mine, theirs, strict=True) if a != b
            ]
            raise CommError(f"rank {self.rank} and rank {left} disagree on {name}: " + ", ".join(diffs))

    def _chunks(self, start: int, end: int, itemsize: int) -> list[tuple[int, int]]:
        step = max(1, self.chunk_bytes // itemsize)
        return [(s, min(s + step, end)) for s in range(start, end, step)]

    def _ring(
        self,
        flat: np.ndarray,
        bounds: list[int],
        schedule: list[tuple[int, int, bool]],
        ufunc: np.ufunc | None,
    ) -> None:
        """Run ring steps (send segment, receive segment, reduce?) with chunk-level pipelining.

        The segment received at step t is the one sent at step t+1, so each
        received chunk is queued for sending as soon as it is reduced.
        """
        right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        scratch = np.frombuffer(self._scratch, dtype=flat.dtype)
        first = schedule[0][0]
        for s, e in self._chunks(bounds[first], bounds[first + 1], flat.itemsize):
            self._send(right, DATA, flat[s:e])
        for t, (_, received, reduce) in enumerate(schedule):
            forward = t + 1 < len(schedule)
            for s, e in self._chunks(bounds[received], bounds[received + 1], flat.itemsize):
                if reduce:
                    incoming = scratch[: e - s]
                    self._recv_frame(left, DATA, memoryview(incoming).cast("B"))
                    ufunc(flat[s:e], incoming, out=flat[s:e])  # type: ignore[misc]
                else:
                    self._recv_frame(left, DATA, memoryview(flat[s:e]).cast("B"))
                if forward:
                    self._send(right, DATA, flat[s:e])

    def allreduce(self, array: np.ndarray, op: ReduceOp = ReduceOp.SUM) -> np.ndarray:
        flat = check_array(array, op)
        if self.size == 1:
            return array

        def body() -> None:
            self._agree("allreduce", flat)
            if flat.nbytes >= SHM_MIN_BYTES and self._shared_windows() is not None:
                assert self._shm is not None
                self._shm.allreduce(flat, UFUNCS[op], self.size, self._sync)
            elif flat.size:
                self._ring_allreduce(flat, op)
            self._sender.flush()  # queued sends still read `flat`: finish them before scaling it
            if op is ReduceOp.MEAN:
                np.divide(flat, self.size, out=flat)

        self._run(body)
        return array

    def allgather(self, array: np.ndarray) -> np.ndarray:
        flat = check_array(np.ascontiguousarray(array))
        out = np.empty((self.size, *array.shape), dtype=array.dtype)
        out[self.rank] = array
        if self.size == 1:
            return out

        def body() -> None:
            self._agree("allgather", flat)
            if flat.size:
                self._ring_allgather(out)

        self._run(body)
        return out

    def _ring_allgather(self, out: np.ndarray) -> None:
        """Ring all-gather of the rows of `out`; this rank's row is already in place."""
        n, r = self.size, self.rank
        bounds = [out[0].size * i for i in range(n + 1)]
        self._ring(out.reshape(-1), bounds, [((r - t) % n, (r - t - 1) % n, False) for t in range(n - 1)], None)

    def _ring_allreduce(self, flat: np.ndarray, op: ReduceOp) -> None:
        """Ring reduce-scatter then all-gather, in place (MEAN stays a SUM; the caller scales it)."""
        n, r = self.size, self.rank
        bounds = [flat.size * i // n for i in range(n + 1)]
        steps = [((r - t) % n, (r - t - 1) % n, True) for t in range(n - 1)]
        steps += [((r + 1 - t) % n, (r - t) % n, False) for t in range(n - 1)]
        self._ring(flat, bounds, steps, UFUNCS[op])

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        flat = check_array(array)
        if not 0 <= root < self.size:
            raise ValueError(f"root {root} is not a rank of a group of size {self.size}")
        if self.size == 1:
            return array

        def body() -> None:
            self._agree("broadcast", flat, root)
            # A pipelined chain root -> root+1 -> ...: each rank forwards chunks as they arrive.
            right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
            last = (root - 1) % self.size
            for s, e in self._chunks(0, flat.size, flat.itemsize):
                if self.rank != root:
                    self._recv_frame(left, DATA, memoryview(flat[s:e]).cast("B"))
                if self.rank != last:
                    self._send(right, DATA, flat[s:e])

        self._run(body)
        return array

    def barrier(self) -> None:
        self.allreduce(np.zeros(1, dtype=np.int64))

    def _sync(self) -> None:
        """A two-hop barrier through rank 0, for the shared-memory windows."""
        if self.rank == 0:
            for peer in range(1, self.size):
                self._recv_frame(peer, SYNC, self._empty)
            for peer in range(1, self.size):
                self._send(peer, SYNC, b"")
            self._sender.flush()
        else:
            self._send(0, SYNC, b"")
            self._sender.flush()
            self._recv_frame(0, SYNC, self._empty)

    @property
    def shared_memory(self) -> bool:
        """Whether large allreduces go through same-host shared memory (decided on first use)."""
        return self._shm is not None

    def _shared_windows(self) -> SharedWindows | None:
        """Set up shared memory once, collectively; every rank reaches the same answer."""
        if self._shm_state != "untried":
            return self._shm
        own, record = None, np.zeros(64, np.uint8)
        try:
            own, raw = SharedWindows.create(WINDOW_BYTES)
            record = np.frombuffer(raw, np.uint8).copy()
        except OSError:
            pass  # no /dev/shm, or it is full: the others learn it from the empty record
        records = np.empty((self.size, record.size), record.dtype)
        records[self.rank] = record
        self._ring_allgather(records)
        everyone_created = own is not None and bool(records[:, 0].all())  # an empty record means "failed"
        segments = SharedWindows.attach(records, self.rank, own) if everyone_created else None
        ok = np.array([1 if segments is not None else 0], np.int64)
        self._ring_allreduce(ok, ReduceOp.MIN)
        self._sender.flush()  # the agreement travels through the sender; settle it before going on
        if own is not None:
            own.unlink()  # every rank has mapped it (or given up): the name is no longer needed
        if ok[0] and segments is not None and own is not None:
            self._shm = SharedWindows(own, segments, self.rank, WINDOW_BYTES)
            self._shm_state = "on"
        else:
            for segment in segments or ([own] if own is not None else []):
                segment.close()
            self._shm_state = "off"
        return self._shm

    def send(self, array: np.ndarray, dest: int) -> None:
        flat = check_array(np.ascontiguousarray(array))
        self._check_peer(dest)

        def body() -> None:
            self._send(dest, META_KIND, META.pack(0, *signature(flat, OPCODES["send"]), self.rank))
            self._send(dest, DATA, flat)

        self._run(body)

    def isend(self, array: np.ndarray, dest: int) -> SendHandle:
        # Frames go to the sender thread's queue; wait() flushes it, surfacing any failure.
        flat = check_array(np.ascontiguousarray(array))
        self._check_peer(dest)
        self._run(lambda: None)  # refuse at once if the communicator already failed
        self._send(dest, META_KIND, META.pack(0, *signature(flat, OPCODES["send"]), self.rank))
        self._send(dest, DATA, flat)
        return _Queued(self, flat)

    def recv(self, array: np.ndarray, source: int) -> np.ndarray:
        flat = check_array(array)
        self._check_peer(source)

        def body() -> None:
            self._recv_frame(source, META_KIND, memoryview(self._meta))
            _, _, dtype, count, _ = META.unpack(self._meta)
            if (dtype, count) != signature(flat, 0)[1:]:
                raise CommError(
                    f"rank {self.rank}: rank {source} sent {numpy_dtype(dtype).name}[{count}], "
                    f"the receive buffer is {flat.dtype.name}[{flat.size}]"
                )
            self._recv_frame(source, DATA, memoryview(flat).cast("B"))

        self._run(body)
        return array

    def _check_peer(self, peer: int) -> None:
        if peer == self.rank or not 0 <= peer < self.size:
            raise ValueError(f"rank {self.rank}: {peer} is not another rank of a group of size {self.size}")

    def close(self) -> None:
        if self._broken is None:
            self._sender.flush()
            self._broken = "communicator closed"
        self._sender.stop()
        if self._shm is not None:
            self._shm.close()
        for sock in self.sockets.values():
            sock.close()


class _Queued:
    def __init__(self, comm: TCPCommunicator, buffer: np.ndarray) -> None:
        self.comm, self.buffer = comm, buffer  # the buffer stays referenced until sent

    def wait(self) -> None:
        self.comm._run(lambda: None)


def _show(field: str, value: int) -> str:
    if field == "dtype":
        try:
            return numpy_dtype(value).name
        except ValueError:
            return str(value)
    if field == "operation":
        return {v: k for k, v in OPCODES.items()}.get(value, str(value))
    return str(value)


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


def listen(host: str = "127.0.0.1", port: int = 0, backlog: int = 128) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    return listener
