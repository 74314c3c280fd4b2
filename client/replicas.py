"""One channel to several replicas of a service ("HOST:PORT,HOST:PORT"): calls go to one replica and
move to the next when it fails.

Each replica has a channel of its own, which resolves its name itself (again after a restart, as any
channel does), so a replica that is down or not yet resolvable when the client starts is no obstacle.
A call that fails with UNAVAILABLE or DEADLINE_EXCEEDED (a replica gone or frozen) moves the next
call to the next replica; the caller's retry policy retries the calls that are idempotent, so they
land there. Unary calls and the streams of the parameter server's replica sets are spread this way; a
bidirectional stream stays on the replica current when it was made.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

MOVE_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ReplicaChannel(grpc.Channel):
    def __init__(self, addresses: list[str], open_one: Callable[[str], grpc.Channel]) -> None:
        self.addresses = addresses
        self._channels = [open_one(address) for address in addresses]
        self._current = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> int:
        return self._current

    def failed(self, index: int, error: BaseException | None) -> None:
        """A call to replica `index` ended with `error`: if the replica looks gone, use the next one."""
        if isinstance(error, grpc.RpcError) and error.code() in MOVE_ON:
            with self._lock:
                if self._current == index:
                    self._current = (index + 1) % len(self._channels)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:  # a _ReplicaCall
        return _ReplicaCall(self, [channel.unary_unary(method, *args, **kwargs) for channel in self._channels])

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:  # a _ReplicaStream
        return _ReplicaStream(self, [channel.unary_stream(method, *args, **kwargs) for channel in self._channels])

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:  # a _ReplicaCall
        return _ReplicaCall(self, [channel.stream_unary(method, *args, **kwargs) for channel in self._channels])

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._channels[self._current].stream_stream(method, *args, **kwargs)

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        self._channels[self._current].subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._channels[self._current].unsubscribe(callback)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> ReplicaChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ReplicaCall:
    """A unary method on every replica; each call goes to the current one."""

    def __init__(self, replicas: ReplicaChannel, calls: list[Any]) -> None:
        self._replicas, self._calls = replicas, calls

    def _on_current(self, how: str, request: Any, *args: Any, **kwargs: Any) -> Any:
        index = self._replicas.current
        call = self._calls[index]
        try:
            return getattr(call, how)(request, *args, **kwargs)
        except grpc.RpcError as error:
            self._replicas.failed(index, error)
            raise

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._on_current("__call__", request, *args, **kwargs)

    def with_call(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._on_current("with_call", request, *args, **kwargs)

    def future(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        index = self._replicas.current
        future = self._calls[index].future(request, *args, **kwargs)
        future.add_done_callback(lambda done: self._replicas.failed(index, done.exception()))
        return future


class _ReplicaStream:
    """A server-streaming method on every replica; a call goes to the current one, and a failure
    while its answers are read moves the next call on, as for unary calls."""

    def __init__(self, replicas: ReplicaChannel, calls: list[Any]) -> None:
        self._replicas, self._calls = replicas, calls

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        index = self._replicas.current
        return self._read(index, self._calls[index](request, *args, **kwargs))

    def _read(self, index: int, answers: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from answers
        except grpc.RpcError as error:
            self._replicas.failed(index, error)
            raise
