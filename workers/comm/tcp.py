"""TCP backend: a bandwidth-optimal ring allreduce over persistent sockets.

A collective is a schedule of ring steps over the mesh (see mesh.py); each step
sends one segment to the right neighbour and receives another from the left,
chunk by chunk. The mesh's sender thread works through the chunks while the
main thread receives and reduces, so sending, receiving and reducing overlap.
Arrays are reduced in place; the only scratch buffer is one chunk.

Before each collective, neighbours exchange what they are about to do
(sequence, operation, dtype, count, root), so ranks that call different
collectives fail with a CommError naming the difference instead of hanging.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

import numpy as np

from nanodist.wire.codec import numpy_dtype
from nanodist.workers.comm.base import (
    UFUNCS,
    CommError,
    Communicator,
    ReduceOp,
    SendHandle,
    Watch,
    check_array,
    signature,
)
from nanodist.workers.comm.mesh import DATA, DEFAULT_TIMEOUT, META_KIND, SYNC, Mesh
from nanodist.workers.comm.shm import WINDOW_BYTES, SharedWindows

META = struct.Struct("<qqqqq")  # sequence, opcode, dtype, count, root
OPCODES = {"allreduce": 1, "broadcast": 2, "allgather": 3, "barrier": 4, "send": 5}
CHUNK_BYTES = 1 << 20
SHM_MIN_BYTES = 256 << 10  # below this the socket ring's lower latency wins

# One ring step: (segment sent, segment received, how to fold the received one in; None = overwrite).
Step = tuple[int, int, np.ufunc | None]


class TCPCommunicator(Communicator):
    def __init__(self, mesh: Mesh, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.mesh = mesh
        self.rank, self.size = mesh.rank, mesh.size
        self.chunk_bytes = chunk_bytes
        self._scratch = bytearray(chunk_bytes)
        self._meta = bytearray(META.size)
        self._seq = 0
        self._broken: str | None = None
        self._shm: SharedWindows | None = None
        self._shm_state = "untried" if os.environ.get("NANODIST_COMM_SHM", "1") != "0" else "off"

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
        """Build the mesh (rank r listens on addresses[r]) and a communicator over it."""
        mesh = Mesh.connect(rank, addresses, listener, group=group, timeout=timeout)
        return cls(mesh, chunk_bytes=chunk_bytes)

    # --- running a collective ----------------------------------------------

    def _run(self, body: Callable[[], None]) -> None:
        if self._broken:
            raise CommError(f"communicator is unusable after an earlier failure: {self._broken}")
        try:
            body()
            self.mesh.flush()
        except CommError as error:
            self._broken = str(error)
            self.mesh.abort(str(error))
            raise

    def watch(self, probe: Watch) -> None:
        self.mesh.watch = probe

    def name_ranks(self, first: int) -> None:
        self.mesh.first_job_rank = first

    def _agree(self, name: str, flat: np.ndarray, root: int = 0) -> None:
        """Exchange (sequence, op, dtype, count, root) around the ring; any difference is an error."""
        self._seq += 1
        mine = (self._seq, *signature(flat, OPCODES[name]), root)
        left, right = (self.rank - 1) % self.size, (self.rank + 1) % self.size
        self.mesh.send(right, META_KIND, META.pack(*mine))
        self.mesh.recv_frame(left, META_KIND, self._meta)
        theirs = META.unpack(self._meta)
        if theirs != mine:
            names = ("sequence", "operation", "dtype", "count", "root")
            diffs = [
                f"{n} {_show(n, a)} vs {_show(n, b)}" for n, a, b in zip(names, mine, theirs, strict=True) if a != b
            ]
            raise CommError(
                f"{self.mesh.name(self.rank)} and {self.mesh.name(left)} disagree on {name}: " + ", ".join(diffs)
            )

    def _chunks(self, start: int, end: int, itemsize: int) -> list[tuple[int, int]]:
        step = max(1, self.chunk_bytes // itemsize)
        return [(s, min(s + step, end)) for s in range(start, end, step)]

    def _ring(self, flat: np.ndarray, bounds: list[int], schedule: list[Step]) -> None:
        """Run ring steps with chunk-level pipelining.

        The segment received at step t is the one sent at step t+1, so each
        received chunk is queued for sending as soon as it is reduced.
        """
        right, left = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        scratch = np.frombuffer(self._scratch, dtype=flat.dtype)
        first = schedule[0][0]
        for s, e in self._chunks(bounds[first], bounds[first + 1], flat.itemsize):
            self.mesh.send(right, DATA, flat[s:e])
        for t, (_, received, ufunc) in enumerate(schedule):
            forward = t + 1 < len(schedule)
            for s, e in self._chunks(bounds[received], bounds[received + 1], flat.itemsize):
                if ufunc is not None:
                    incoming = scratch[: e - s]
                    self.mesh.recv_frame(left, DATA, incoming)
                    ufunc(flat[s:e], incoming, out=flat[s:e])
                else:
                    self.mesh.recv_frame(left, DATA, flat[s:e])
                if forward:
                    self.mesh.send(right, DATA, flat[s:e])

    def _ring_allgather(self, out: np.ndarray) -> None:
        """Ring all-gather of the rows of `out`; this rank's row is already in place."""
        n, r = self.size, self.rank
        bounds = [out[0].size * i for i in range(n + 1)]
        self._ring(out.reshape(-1), bounds, [((r - t) % n, (r - t - 1) % n, None) for t in range(n - 1)])

    def _ring_allreduce(self, flat: np.ndarray, op: ReduceOp) -> None:
        """Ring reduce-scatter then all-gather, in place (MEAN stays a SUM; the caller scales it)."""
        n, r, ufunc = self.size, self.rank, UFUNCS[op]
        bounds = [flat.size * i // n for i in range(n + 1)]
        steps: list[Step] = [((r - t) % n, (r - t - 1) % n, ufunc) for t in range(n - 1)]
        steps += [((r + 1 - t) % n, (r - t) % n, None) for t in range(n - 1)]
        self._ring(flat, bounds, steps)

    # --- collectives -------------------------------------------------------

    def allreduce(self, array: np.ndarray, op: ReduceOp = ReduceOp.SUM) -> np.ndarray:
        flat = check_array(array, op)
        if self.size == 1:
            return array

        def body() -> None:
            self._agree("allreduce", flat)
            shm = self._shared_windows() if flat.nbytes >= SHM_MIN_BYTES else None
            if shm is not None:
                shm.allreduce(flat, UFUNCS[op], self.size, self._sync)
            elif flat.size:
                self._ring_allreduce(flat, op)
            self.mesh.flush()  # queued sends still read `flat`: finish them before scaling it
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
                    self.mesh.recv_frame(left, DATA, flat[s:e])
                if self.rank != last:
                    self.mesh.send(right, DATA, flat[s:e])

        self._run(body)
        return array

    def barrier(self) -> None:
        self.allreduce(np.zeros(1, dtype=np.int64))

    # --- same-host shared memory -------------------------------------------

    def _sync(self) -> None:
        """A two-hop barrier through rank 0, for the shared-memory windows."""
        if self.rank == 0:
            for peer in range(1, self.size):
                self.mesh.recv_frame(peer, SYNC, b"")
            for peer in range(1, self.size):
                self.mesh.send(peer, SYNC, b"")
            self.mesh.flush()
        else:
            self.mesh.send(0, SYNC, b"")
            self.mesh.flush()
            self.mesh.recv_frame(0, SYNC, b"")

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
        segments = SharedWindows.attach(records, self.rank, own) if own is not None and everyone_created else None
        ok = np.array([1 if segments is not None else 0], np.int64)
        self._ring_allreduce(ok, ReduceOp.MIN)
        self.mesh.flush()  # the agreement travels through the sender; settle it before going on
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

    # --- point to point ----------------------------------------------------

    def send(self, array: np.ndarray, dest: int) -> None:
        flat = check_array(np.ascontiguousarray(array))
        self._check_peer(dest)

        def body() -> None:
            self.mesh.send(dest, META_KIND, META.pack(0, *signature(flat, OPCODES["send"]), self.rank))
            self.mesh.send(dest, DATA, flat)

        self._run(body)

    def isend(self, array: np.ndarray, dest: int) -> SendHandle:
        # Frames go to the sender thread's queue; wait() flushes it, surfacing any failure.
        flat = check_array(np.ascontiguousarray(array))
        self._check_peer(dest)
        self._run(lambda: None)  # refuse at once if the communicator already failed
        self.mesh.send(dest, META_KIND, META.pack(0, *signature(flat, OPCODES["send"]), self.rank))
        self.mesh.send(dest, DATA, flat)
        return _Queued(self, flat)

    def recv(self, array: np.ndarray, source: int) -> np.ndarray:
        flat = check_array(array)
        self._check_peer(source)

        def body() -> None:
            self.mesh.recv_frame(source, META_KIND, self._meta)
            _, _, dtype, count, _ = META.unpack(self._meta)
            if (dtype, count) != signature(flat, 0)[1:]:
                raise CommError(
                    f"{self.mesh.name(self.rank)}: {self.mesh.name(source)} sent {numpy_dtype(dtype).name}[{count}], "
                    f"the receive buffer is {flat.dtype.name}[{flat.size}]"
                )
            self.mesh.recv_frame(source, DATA, flat)

        self._run(body)
        return array

    def _check_peer(self, peer: int) -> None:
        if peer == self.rank or not 0 <= peer < self.size:
            raise ValueError(f"rank {self.rank}: {peer} is not another rank of a group of size {self.size}")

    def close(self) -> None:
        try:
            if self._broken is None:
                self.mesh.flush()  # frames queued by isend() go out before the sockets close
        finally:
            self._broken = self._broken or "communicator closed"
            self.mesh.close()
            if self._shm is not None:
                self._shm.close()


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
