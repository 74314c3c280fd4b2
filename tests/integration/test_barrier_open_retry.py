"""A barrier client behind a proxy that loses or delays answers: a retried OpenSession whose first
response was lost opens one session, not an orphan that lapses; a slow KeepAlive answer still renews."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import grpc
import pytest

from nanodist.client import BarrierClient, InvalidArgument
from nanodist.client.errors import from_rpc_error
from nanodist.services.barrier.server import BarrierService
from nanodist.v1 import barrier_pb2 as pb
from nanodist.v1 import barrier_pb2_grpc
from tests.conftest import free_port
from tests.integration.test_lock import wait_until

T = TypeVar("T")
TTL = 1.0  # seconds; an orphaned session would lapse after this and break its barriers


class LoopThread:
    """An asyncio loop in a daemon thread, for in-process grpc.aio servers next to a blocking test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class LosingProxy(grpc.GenericRpcHandler):
    """Forwards every unary call to `upstream`, but answers the first OpenSession with UNAVAILABLE
    after the server has opened the session: the response is lost on the way back. With
    keep_alive_delay, every KeepAlive's answer comes back that many seconds after the server gave it."""

    def __init__(self, upstream: str, keep_alive_delay: float = 0.0) -> None:
        self.upstream = upstream
        self.keep_alive_delay = keep_alive_delay
        self.opens = 0

    async def start(self) -> int:
        self.channel = grpc.aio.insecure_channel(self.upstream)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    async def stop(self) -> None:
        await self.server.stop(None)
        await self.channel.close()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(self._forwarder(details.method))

    def _forwarder(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        upstream = self.channel.unary_unary(method)  # bytes in, bytes out

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                response = await upstream(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                context.set_trailing_metadata(tuple(error.trailing_metadata() or ()))
                await context.abort(error.code(), error.details() or "")
            if method.endswith("/KeepAlive"):
                await asyncio.sleep(self.keep_alive_delay)
            if method.endswith("/OpenSession"):
                self.opens += 1
                if self.opens == 1:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "proxy: connection lost before the response")
            return response

        return forward


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def test_a_lost_open_response_leaves_no_orphan_session_to_break_the_barrier(start_server, loop):
    server = start_server("barrier")
    proxy = LosingProxy(server.address)
    port = loop.run(proxy.start())
    try:
        with (
            BarrierClient(f"127.0.0.1:{port}", "retried", session_ttl=TTL, barriers=["b"]) as retried,
            BarrierClient(server.address, "direct", session_ttl=TTL, barriers=["b"]) as direct,
        ):
            assert proxy.opens == 2, "the client should have retried the lost OpenSession"
            # Past the TTL an orphaned first session would have lapsed and broken "b",
            # naming "retried"; a fixed wait is the point of this check.
            time.sleep(3 * TTL)
            (state,) = direct.status("b")
            assert state.broken_reason == "" and retried.session_lost is None
            released = []
            waiter = threading.Thread(target=lambda: released.append(direct.wait("b", 2, timeout=10)))
            waiter.start()
            assert retried.wait("b", 2, timeout=10).generation == 0
            waiter.join(timeout=15)
            assert [r.generation for r in released] == [0]
    finally:
        loop.run(proxy.stop())


def test_a_keep_alive_answered_late_still_renews_the_session(start_server, loop):
    """A loaded barrier service answers after the heartbeat's interval (TTL/3), within the TTL: each late
    answer still renews the member's view of its session (from when it was sent), so it does not take
    itself for left behind. Before, every such beat timed out and its renewal was never counted."""
    ttl = 4.0
    server = start_server("barrier")
    proxy = LosingProxy(server.address, keep_alive_delay=ttl / 2)  # longer than a beat's interval
    port = loop.run(proxy.start())
    try:
        with (
            BarrierClient(f"127.0.0.1:{port}", "slow", session_ttl=ttl, barriers=["b"]) as slow,
            BarrierClient(server.address, "direct", session_ttl=ttl, barriers=["b"]) as direct,
        ):
            opened = slow.renewed_at
            wait_until(lambda: slow.renewed_at > opened, timeout=30)  # a late answer counted
            (state,) = direct.status("b")
            assert state.broken_reason == "" and slow.session_lost is None
    finally:
        loop.run(proxy.stop())


def open_session(stub: barrier_pb2_grpc.BarrierStub, member: str, key: str) -> pb.OpenSessionResponse:
    try:
        return stub.OpenSession(pb.OpenSessionRequest(member_id=member, ttl_ms=10_000, idempotency_key=key), timeout=10)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


def test_a_repeated_key_returns_the_live_session_and_is_forgotten_with_it(loop):
    service = BarrierService()

    async def start() -> grpc.aio.Server:
        server = grpc.aio.server()
        barrier_pb2_grpc.add_BarrierServicer_to_server(service, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server

    port = free_port()
    server = loop.run(start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = barrier_pb2_grpc.BarrierStub(channel)
            first = open_session(stub, "m", "k1")
            assert open_session(stub, "m", "k1").session_id == first.session_id
            with pytest.raises(InvalidArgument, match="idempotency_key: 'k1' already opened a session"):
                open_session(stub, "other", "k1")
            with pytest.raises(InvalidArgument, match="idempotency_key"):
                open_session(stub, "m", "not a name")
            # Once the session ends, its key opens a new one, and ended sessions' keys are dropped.
            stub.CloseSession(pb.CloseSessionRequest(session_id=first.session_id), timeout=10)
            assert open_session(stub, "m", "k1").session_id != first.session_id
            for i in range(50):
                opened = open_session(stub, "m", f"churn-{i}")
                stub.CloseSession(pb.CloseSessionRequest(session_id=opened.session_id), timeout=10)
            assert len(service.sessions.leases) == 1
            assert len(service.open_keys) <= 2 * (len(service.sessions.leases) + 1)  # not one per open
    finally:
        loop.run(server.stop(None))
