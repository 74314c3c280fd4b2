"""A client's tensor lane to one shard: Push and Pull over a connection of their own.

The lane carries the very bytes a gRPC Push or Pull would (see nanodist.wire.lane
and docs/lane.md), so it changes how fast a call goes, never what
it does. On the shard's host the client passes the shard a memfd that both map:
a push is written into it once and read from it in place. Elsewhere a push is
sent straight from the tensors' memory over TCP. Whenever a lane cannot be had
(the shard has none, its port is unreachable, it broke) the call goes over gRPC,
and a broken lane is opened again on a later call.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar, cast

import grpc
import numpy as np

from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec, lane
from nanodist.wire.framing import Parts

log = logging.getLogger("nanodist.client.lane")
Pulled = tuple[list[codec.Entry], int]
MIN_REGION_BYTES = 1 << 20
REOPEN_AFTER_SECONDS = 10.0  # after a lane failed to open, gRPC alone for this long
MAX_LANES = 4  # connections per shard: concurrent calls beyond these go over gRPC
CONNECT_SECONDS = 5.0  # a firewall that drops the lane port costs this, once per REOPEN_AFTER_SECONDS
_CODES = {code.value[0]: code for code in grpc.StatusCode}
T = TypeVar("T")


LANE_SETTINGS = ("on", "tcp", "off")  # the best lane; the TCP lane even on the shard's host; gRPC alone


def lane_setting(setting: str | None) -> str:
    """`setting`, else NANODIST_LANES, else "on"; ValueError for anything but on, tcp or off."""
    chosen = setting or os.environ.get("NANODIST_LANES") or "on"
    if chosen not in LANE_SETTINGS:
        source = "lanes" if setting else "NANODIST_LANES"
        raise ValueError(f"{source}={chosen!r}: expected one of {', '.join(LANE_SETTINGS)}")
    return chosen


class LaneError(grpc.RpcError):
    """A lane call that failed, with the status gRPC would have given, so callers handle both alike."""

    def __init__(self, code: grpc.StatusCode, details: str, answered: bool = False) -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self.answered = answered  # the shard answered with this status (the connection is still in step)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class LaneCall(Generic[T]):
    """A call whose request is on its way; `result()` reads its answer and gives the lane back."""

    def __init__(self, lane: Lane, decode: Callable[[memoryview], T], timeout: float) -> None:
        self.lane = lane
        self.decode = decode
        self.timeout = timeout
        self.done = False
        self.value: T | None = None
        self.error: LaneError | None = None

    def fail(self, error: LaneError) -> None:
        self.error, self.done = error, True

    def abandon(self) -> None:
        """The caller will not read this answer: close the lane (its stream would be out of step)."""
        if not self.done:
            self.fail(LaneError(grpc.StatusCode.CANCELLED, "abandoned: another shard's call failed"))
            self.lane.close()
            self.lane.give_back(self.lane)

    def result(self) -> T:
        if not self.done:
            self.lane.finish(self)
            self.lane.give_back(self.lane)
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


class Lane:
    """One open connection to a shard's lane, lent to one call at a time (see LaneLink). A call sends its
    request at once and reads its answer when asked, so calls to several shards overlap with no thread
    of their own."""

    def __init__(
        self,
        host: str,
        info: ps.OpenLaneResponse,
        timeout: float,
        local: bool = True,
        give_back: Callable[[Lane], None] = lambda lane: None,
    ) -> None:
        self.max_message_bytes = info.max_message_bytes
        self.give_back = give_back  # called once a call's answer is read, to lend the lane again
        self.sock = _connect(host, info, timeout, local)
        self.local = self.sock.family == socket.AF_UNIX
        self.buffer = lane.Buffer()
        self.region: mmap.mmap | None = None
        self.broken = False
        try:
            self.sock.settimeout(min(timeout, CONNECT_SECONDS))  # a port that is not a lane's never answers
            lane.send_all(self.sock, [lane.MAGIC, info.secret])
            self._answer()
        except BaseException:
            self.close()
            raise

    @property
    def carrier(self) -> str:
        return "local" if self.local else "tcp"

    def push(self, parts: Parts, timeout: float) -> LaneCall[ps.PushResponse]:
        def decode(body: memoryview) -> ps.PushResponse:
            return ps.PushResponse.FromString(bytes(body))

        return self._start(lane.PUSH, parts.items, parts.size, timeout, 0, 0, decode)

    def pull(
        self, request: ps.PullRequest, timeout: float, expect: int, targets: Mapping[str, np.ndarray]
    ) -> LaneCall[Pulled]:
        def decode(body: memoryview) -> Pulled:
            entries, slowest = codec.decode_pull_response(body)  # views of the lane's memory: copied out now
            for entry in entries:
                if entry.dense is not None:
                    entry.dense = _copied(entry.dense, targets.get(entry.key))
                if entry.values is not None and entry.rows is not None:
                    entry.values, entry.rows = entry.values.copy(), entry.rows.copy()
            return entries, slowest

        data = request.SerializeToString()
        return self._start(lane.PULL, [data], len(data), timeout, request.timeout_ms, expect, decode)

    def close(self) -> None:
        """Close the connection; a call waiting on it (in another thread) wakes and fails UNAVAILABLE."""
        self.broken = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # never connected, or already cut
        try:
            self.sock.close()
        finally:
            if self.region is not None:
                try:
                    self.region.close()
                except BufferError:
                    pass  # an answer is still viewed: the mapping goes with it

    def _start(
        self,
        method: int,
        pieces: Sequence[bytes | memoryview],
        size: int,
        timeout: float,
        timeout_ms: int,
        expect: int,
        decode: Callable[[memoryview], T],
    ) -> LaneCall[T]:
        call = LaneCall(self, decode, timeout)
        try:
            if self.broken:
                raise lane.LaneClosed("the tensor lane is closed")
            self.sock.settimeout(timeout)
            if self.local:
                self._hold(max(size, expect + 4096))
                assert self.region is not None
                Parts.write_pieces(pieces, memoryview(self.region))
                lane.send_all(self.sock, [lane.HEADER.pack(method, lane.IN_REGION, 0, timeout_ms, size)])
            else:
                lane.send_all(self.sock, [lane.HEADER.pack(method, 0, 0, timeout_ms, size), *pieces])
        except (OSError, lane.LaneClosed, LaneError) as error:
            call.fail(self._failure(error, timeout))
            self.give_back(self)
        return call

    def finish(self, call: LaneCall[Any]) -> None:
        """Read `call`'s answer."""
        try:
            self.sock.settimeout(call.timeout)
            call.value = call.decode(self._answer())
            call.done = True
        except (OSError, lane.LaneClosed, LaneError) as error:
            call.fail(self._failure(error, call.timeout))

    def _failure(self, error: Exception, timeout: float) -> LaneError:
        """The status for a failed call; a lane whose stream may be out of step is closed."""
        if isinstance(error, LaneError) and error.answered:
            return error  # the shard refused the call: the lane goes on
        self.close()
        if isinstance(error, LaneError):
            return error
        if isinstance(error, TimeoutError):
            return LaneError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer on the tensor lane within {timeout:g} s")
        return LaneError(grpc.StatusCode.UNAVAILABLE, f"the tensor lane was cut: {error}")

    def _answer(self) -> memoryview:
        status, flags, _, length = lane.recv_header(self.sock)
        if flags & lane.IN_REGION:
            if self.region is None or length > len(self.region):
                raise lane.LaneClosed(f"an answer of {length} bytes said to be in a region that cannot hold it")
            body = memoryview(self.region)[:length]
        else:
            body = self.buffer.take(length)
            lane.recv_exact(self.sock, body)
        if status != lane.OK:
            code = _CODES.get(status, grpc.StatusCode.UNKNOWN)
            raise LaneError(code, bytes(body).decode(errors="replace"), answered=True)
        return body

    def _hold(self, size: int) -> None:
        """Make the shared region at least `size` bytes: a new memfd, passed to the shard with its size."""
        if self.region is not None and len(self.region) >= size:
            return
        size = max(MIN_REGION_BYTES, 1 << (size - 1).bit_length())
        fd = os.memfd_create("nanodist-lane", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size)
            socket.send_fds(self.sock, [lane.HEADER.pack(lane.REGION, 0, 0, 0, size)], [fd])
        finally:
            os.close(fd)
        if self.region is not None:
            try:
                self.region.close()
            except BufferError:
                pass
        self.region = region
        self._answer()


def _copied(view: np.ndarray, target: np.ndarray | None) -> np.ndarray:
    if target is not None and target.shape == view.shape and target.dtype == view.dtype:
        np.copyto(target, view)
        return target
    return view.copy()


def _connect(host: str, info: ps.OpenLaneResponse, timeout: float, local: bool) -> socket.socket:
    """The local lane if this process reaches the shard's socket (same host), else its TCP lane."""
    if local and info.local_socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect("\0" + info.local_socket)
            return sock
        except OSError:
            sock.close()  # another host, or another network namespace
    if not info.tcp_port:
        raise OSError("the shard offers only its local lane, and this process is not on its host")
    sock = socket.create_connection((host, info.tcp_port), timeout=min(timeout, CONNECT_SECONDS))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class LaneLink:
    """A shard's lanes: connections lent to one call at a time, opened as calls need them (a pull waiting
    for a BSP step must not hold up the push that completes it), up to MAX_LANES; beyond, or when no
    lane can be had, None: the call goes over gRPC."""

    def __init__(self, address: str, open_lane: Callable[..., ps.OpenLaneResponse], setting: str) -> None:
        self.host = address.rsplit(":", 1)[0].strip("[]")
        self.open_lane = open_lane
        self.enabled = setting != "off"
        self.local = setting == "on"
        self.info: ps.OpenLaneResponse | None = None  # what OpenLane said, until a lane breaks
        self.lanes: list[Lane] = []  # every open lane, lent or idle
        self.idle: list[Lane] = []
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._warned = False

    @property
    def lane(self) -> Lane | None:
        """An open lane, if there is one (for tests and status)."""
        return next((lane for lane in self.lanes if not lane.broken), None)

    def get(self, timeout: float, size: int) -> Lane | None:
        """A lane lent to one call of about `size` bytes (its LaneCall gives it back), or None."""
        if not self.enabled or (self.info is not None and size >= self.info.max_message_bytes):
            return None  # larger than a lane carries: gRPC streams it
        with self._lock:
            while self.idle:
                lane = self.idle.pop()
                if not lane.broken:
                    return lane
            if len(self.lanes) >= MAX_LANES or time.monotonic() < self._retry_at:
                return None
            if self.info is None:
                try:
                    self.info = self.open_lane(ps.OpenLaneRequest(), timeout=timeout)
                except grpc.RpcError as error:
                    if error.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED):
                        self.enabled = False  # no lane on this shard, or not for this caller's role: gRPC it is
                    return None  # otherwise the shard is away: the call goes over gRPC, and retries reopen
            try:
                lane = Lane(self.host, self.info, timeout, self.local, self._give_back)
            except (OSError, LaneError) as error:
                say = log.debug if self._warned else log.warning  # once: a firewalled port fails every time
                say("tensor lane to %s not opened, using gRPC for %g s: %s", self.host, REOPEN_AFTER_SECONDS, error)
                self._warned = True
                self._retry_at = time.monotonic() + REOPEN_AFTER_SECONDS
                self.info = None
                return None
            self.lanes.append(lane)
            if size >= lane.max_message_bytes:
                self.idle.append(lane)
                return None
            return lane

    def _give_back(self, lane: Lane) -> None:
        with self._lock:
            if not lane.broken:
                self.idle.append(lane)
                return
            if lane in self.lanes:
                self.lanes.remove(lane)
            self.info = None  # the shard may have restarted, with a new secret and port: ask again

    def close(self) -> None:
        with self._lock:
            for lane in self.lanes:
                lane.close()
            self.lanes, self.idle = [], []
