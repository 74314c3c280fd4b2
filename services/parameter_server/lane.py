"""The shard's end of the tensor lane: Push and Pull over a socket of their own (see nanodist.wire.lane).

Each connection is a task on the shard's event loop, where the store lives,
reading frames with recv_into a buffer it keeps and passing each call to the
service's own handlers. So a lane call is checked, deduplicated, logged and
applied exactly as the same call over gRPC is.

Two listeners: TCP, for clients on other hosts, and a Unix socket in Linux's
abstract namespace, which only processes in this network namespace reach. A
client there passes a memfd, a file with no name, that both sides map: a push
is written into it once and summed from it in place, and a pull's answer is
written into it once. Nothing of it is left in /dev/shm or anywhere else when
either side dies, however it dies.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import mmap
import os
import secrets
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from nanodist.services.common.errors import ConfigurationError
from nanodist.services.common.handlers import safe_parser
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import lane
from nanodist.wire.framing import Parts

log = logging.getLogger("nanodist.ps.lane")
PEER_CREDENTIALS = struct.Struct("3i")  # pid, uid, gid of a Unix socket's peer
parse_pull = safe_parser(ps.PullRequest)


class Refused(Exception):
    """A lane call answered with a status other than OK."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LaneContext:
    """What the service's handlers ask of a gRPC context: the caller's deadline, and abort."""

    def __init__(self, timeout_ms: int) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout_ms / 1000 if timeout_ms else None
        self._loop = loop

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Refused(code, details)


PushHandler = Callable[[Any, Any], Coroutine[Any, Any, bytes]]
PullHandler = Callable[[Any, Any], Coroutine[Any, Any, Parts]]


class LaneServer:
    """Listens for lane connections and serves each as a task on the shard's event loop."""

    def __init__(
        self, push: PushHandler, pull: PullHandler, host: str, port: int, tcp: bool, max_message_bytes: int
    ) -> None:
        self.push, self.pull = push, pull
        self.max_message_bytes = max_message_bytes
        self.secret = secrets.token_bytes(lane.SECRET_BYTES)
        self.loop = asyncio.get_running_loop()
        self.listeners: list[socket.socket] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.tcp_port = 0
        if tcp:
            try:
                listener = socket.create_server((host, port))
            except OSError as error:
                raise ConfigurationError(f"--lane-port {port}: cannot bind {host}:{port}: {error.strerror}") from None
            self.tcp_port = listener.getsockname()[1]
            self.listeners.append(listener)
        self.local_socket = f"nanodist-lane-{os.getpid()}-{secrets.token_hex(8)}"
        local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        local.bind("\0" + self.local_socket)
        local.listen()
        self.listeners.append(local)
        for listener in self.listeners:
            listener.setblocking(False)
            self._spawn(self._accept(listener))
        log.info("tensor lane: tcp port %s, local socket @%s", self.tcp_port or "off", self.local_socket)

    def describe(self) -> ps.OpenLaneResponse:
        return ps.OpenLaneResponse(
            tcp_port=self.tcp_port,
            local_socket=self.local_socket,
            secret=self.secret,
            max_message_bytes=self.max_message_bytes,
        )

    def close(self) -> None:
        """Stop accepting and cut every connection; a client's call in flight fails UNAVAILABLE and is retried."""
        for task in list(self.tasks):
            task.cancel()
        for listener in self.listeners:
            listener.close()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        while True:
            conn, _ = await self.loop.sock_accept(listener)
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        connection = Connection(self, conn)
        try:
            await connection.run()
        except (lane.LaneClosed, OSError):
            pass  # the client went away (or cut the connection mid-frame: nothing of that frame was applied)
        finally:
            connection.release()
            conn.close()


class Connection:
    """One client's lane connection: its buffers and, on the local lane, the region it passed."""

    def __init__(self, server: LaneServer, sock: socket.socket) -> None:
        self.server = server
        self.loop = server.loop
        self.sock = sock
        sock.setblocking(False)
        self.local = sock.family == socket.AF_UNIX
        self.buffer = lane.Buffer()  # requests
        self.answers = lane.Buffer()  # pull answers that are not written into the region
        self.region: mmap.mmap | None = None

    async def run(self) -> None:
        if not await self._admitted():
            return
        while True:
            kind, flags, timeout_ms, length, fds = await self._header()
            if kind == lane.REGION:
                await self._map(fds, length)
                continue
            for fd in fds:
                os.close(fd)
            problem = self._frame_problem(kind, flags, length)
            if problem is not None:
                await self._send(int(problem.code.value[0]), 0, problem.message.encode())
                return  # the stream's framing can no longer be trusted
            if flags & lane.IN_REGION:
                assert self.region is not None  # _frame_problem refused a body in a region never passed
                body = memoryview(self.region)[:length]
            else:
                body = self.buffer.take(length)
                await self._recv_exact(body)
            status, answer_flags, answer = await self._call(kind, body, timeout_ms)
            del body  # the handlers keep no view of a request, so the buffer and the region are free again
            await self._send(status, answer_flags, answer)

    def release(self) -> None:
        if self.region is not None:
            try:
                self.region.close()
            except BufferError:
                pass  # a view still open: the mapping goes with it

    async def _recv_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = await self.loop.sock_recv_into(self.sock, view[got:])
            if not n:
                raise lane.LaneClosed(f"the connection closed after {got} of {len(view)} bytes")
            got += n

    async def _admitted(self) -> bool:
        """A connection must first send the magic and the secret (and, locally, come from this user)."""
        hello = bytearray(len(lane.MAGIC) + lane.SECRET_BYTES)
        await self._recv_exact(memoryview(hello))
        if self.local:
            _, uid, _ = PEER_CREDENTIALS.unpack(
                self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEER_CREDENTIALS.size)
            )
            if uid != os.getuid():
                denied = grpc.StatusCode.PERMISSION_DENIED.value[0]
                await self._send(denied, 0, f"user {uid} may not use this lane".encode())
                return False
        if not hmac.compare_digest(bytes(hello), lane.MAGIC + self.server.secret):
            log.warning("tensor lane: refused a connection without the lane's magic and secret")
            message = b"this lane needs its magic and secret first (from OpenLane)"
            await self._send(grpc.StatusCode.UNAUTHENTICATED.value[0], 0, message)
            return False
        await self._send(lane.OK, 0, b"")
        return True

    async def _header(self) -> tuple[int, int, int, int, list[int]]:
        """The next frame's header and, locally, the file descriptors sent with it."""
        raw = bytearray(lane.HEADER.size)
        fds: list[int] = []
        if self.local:
            data, fds = await self._recv_fds(lane.HEADER.size)
            raw[: len(data)] = data
            await self._recv_exact(memoryview(raw)[len(data) :])
        else:
            await self._recv_exact(memoryview(raw))
        kind, flags, _, timeout_ms, length = lane.HEADER.unpack(raw)
        return kind, flags, timeout_ms, length, fds

    async def _recv_fds(self, size: int) -> tuple[bytes, list[int]]:
        """The first bytes of a frame with any descriptors sent along (asyncio has no recvmsg of its own)."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, size, 1)
            except BlockingIOError:
                readable = self.loop.create_future()
                self.loop.add_reader(self.sock, readable.set_result, None)
                try:
                    await readable
                finally:
                    self.loop.remove_reader(self.sock)
                continue
            if not data:
                raise lane.LaneClosed("the connection closed")
            return data, fds

    async def _map(self, fds: list[int], size: int) -> None:
        if len(fds) != 1 or not 0 < size <= self.server.max_message_bytes:
            for fd in fds:
                os.close(fd)
            message = f"a region frame carries one descriptor and 1 to {self.server.max_message_bytes} bytes"
            await self._send(grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, message.encode())
            raise lane.LaneClosed(message)
        try:
            region = mmap.mmap(fds[0], size)
        except (OSError, ValueError) as error:
            await self._send(grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, f"cannot map the region: {error}".encode())
            raise lane.LaneClosed(str(error)) from None
        finally:
            os.close(fds[0])
        self.release()
        self.region = region
        await self._send(lane.OK, 0, b"")

    def _frame_problem(self, kind: int, flags: int, length: int) -> Refused | None:
        if kind not in (lane.PUSH, lane.PULL):
            return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown lane method {kind}")
        if length > self.server.max_message_bytes:
            return Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a frame of {length} bytes exceeds the lane's limit of {self.server.max_message_bytes} bytes; "
                "use PushStream",
            )
        if flags & lane.IN_REGION and (self.region is None or length > len(self.region)):
            held = len(self.region) if self.region is not None else 0
            return Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"a body of {length} bytes in a shared region of {held} bytes"
            )
        return None

    async def _call(self, kind: int, body: memoryview, timeout_ms: int) -> tuple[int, int, bytes | memoryview]:
        """Run one call through the service's handlers: (status, flags, answer). A pull's answer is copied
        before anything else runs on the loop, so that no push lands in the middle of it: into the region
        when it fits, else into the answer buffer."""
        context = LaneContext(timeout_ms)
        try:
            if kind == lane.PUSH:
                return lane.OK, 0, await self.server.push(body, context)
            parts = await self.server.pull(parse_pull(bytes(body)), context)
            if self.region is not None and parts.size <= len(self.region):
                parts.write_into(memoryview(self.region))
                return lane.OK, lane.IN_REGION, memoryview(self.region)[: parts.size]
            answer = self.answers.take(parts.size)
            parts.write_into(answer)
            return lane.OK, 0, answer
        except Refused as refusal:
            return int(refusal.code.value[0]), 0, refusal.message.encode()
        except Exception as error:  # a bug: answered as gRPC answers one, and logged
            log.exception("tensor lane: unexpected error")
            return int(grpc.StatusCode.UNKNOWN.value[0]), 0, f"{type(error).__name__}: {error}".encode()

    async def _send(self, status: int, flags: int, answer: bytes | memoryview) -> None:
        header = lane.HEADER.pack(status, flags, 0, 0, len(answer))
        if flags & lane.IN_REGION or not answer:
            await self.loop.sock_sendall(self.sock, header)
        elif len(answer) < 1 << 16:  # one segment for a small answer
            await self.loop.sock_sendall(self.sock, header + bytes(answer))
        else:
            await self.loop.sock_sendall(self.sock, header)
            await self.loop.sock_sendall(self.sock, answer)
