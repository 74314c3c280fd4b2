"""The Barrier gRPC service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import grpc

from nanodist.services.barrier.state import Barrier, BarrierBroken
from nanodist.services.common.boundary import unary
from nanodist.services.common.errors import exhausted, invalid, not_found
from nanodist.services.common.leases import Lease, LeaseTable, check_ttl
from nanodist.services.common.validation import check_count, check_name, check_range
from nanodist.v1 import barrier_pb2 as pb
from nanodist.v1 import barrier_pb2_grpc

DEFAULT_TIMEOUT_MS = 60_000
MAX_PARTIES = 100_000
MAX_REASON = 1024
MAX_BARRIERS = 100_000
log = logging.getLogger("nanodist.barrier")


def check_open(request: pb.OpenSessionRequest) -> None:
    check_name(request.member_id, "member_id")
    check_ttl(request.ttl_ms)
    check_count(len(request.barriers), "barriers", 1000)
    for i, name in enumerate(request.barriers):
        check_name(name, f"barriers[{i}]")
    if request.idempotency_key:
        check_name(request.idempotency_key, "idempotency_key")


def check_wait(request: pb.WaitRequest) -> float:
    """The wait's timeout in seconds, once the request is found valid."""
    check_name(request.name, "name")
    check_name(request.member_id, "member_id")
    check_range(request.parties, "parties", 1, MAX_PARTIES)
    if request.request_id:
        check_name(request.request_id, "request_id")
    if request.timeout_ms < 0:
        raise invalid(f"timeout_ms: must be >= 0, got {request.timeout_ms}")
    return (request.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000


def check_abort(request: pb.AbortRequest) -> str:
    """The reason the barrier breaks with, once the request is found valid."""
    check_name(request.name, "name")
    if request.member_id:
        check_name(request.member_id, "member_id")
    if len(request.reason) > MAX_REASON:
        raise invalid(f"reason: {len(request.reason)} characters, at most {MAX_REASON}")
    who = repr(request.member_id) if request.member_id else "a client"
    return f"aborted by {who}" + (f": {request.reason}" if request.reason else "")


@contextlib.contextmanager
def missing_in_trailer(context: grpc.aio.ServicerContext) -> Iterator[None]:
    """A broken barrier's missing members also go in the trailing metadata, for clients in any language."""
    try:
        yield
    except BarrierBroken as error:
        context.set_trailing_metadata((("nanodist-missing", ",".join(error.missing)),))
        raise


def lapse_reason(member: str, ttl_ms: int) -> str:
    return f"member {member!r} stopped heartbeating (session lease of {ttl_ms} ms lapsed)"


class BarrierService(barrier_pb2_grpc.BarrierServicer):
    def __init__(self) -> None:
        self.barriers: dict[str, Barrier] = {}
        self.sessions = LeaseTable()
        self.open_keys: dict[str, str] = {}  # OpenSession idempotency_key -> its session's id

    def barrier(self, name: str) -> Barrier:
        check_name(name, "name")
        barrier = self.barriers.get(name)
        if barrier is None:
            if len(self.barriers) >= MAX_BARRIERS:
                raise exhausted(f"name: {len(self.barriers)} barriers exist, the limit of this server ({MAX_BARRIERS})")
            barrier = self.barriers[name] = Barrier(name)
        return barrier

    def _existing(self, name: str) -> Barrier:
        check_name(name, "name")
        barrier = self.barriers.get(name)
        if barrier is None:
            raise not_found(f"name: no barrier {name!r}")
        return barrier

    def _session_lapsed(self, lease: Lease) -> None:
        member = str(lease.payload["member"])
        for barrier in self.barriers.values():
            if member in barrier.known and barrier.break_(lapse_reason(member, lease.ttl_ms), member):
                log.warning("barrier %s broken: session of %s lapsed", barrier.name, member)

    @unary("barrier", "OpenSession")
    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        check_open(request)
        key = request.idempotency_key
        # A retry of an open whose response was lost: hand back the live session
        # rather than open a second one whose lapse would break these barriers.
        lease = self.sessions.leases.get(self.open_keys.get(key, "")) if key else None
        if lease is not None and lease.payload["member"] != request.member_id:
            raise invalid(f"idempotency_key: {key!r} already opened a session for another member")
        self.sessions.start()
        for name in request.barriers:
            self.barrier(name).known.add(request.member_id)
        if lease is not None:
            self.sessions.renew(lease.lease_id)
            return pb.OpenSessionResponse(session_id=lease.lease_id, ttl_ms=lease.ttl_ms)
        lease = self.sessions.grant(request.ttl_ms, self._session_lapsed, member=request.member_id)
        if key:
            self.open_keys[key] = lease.lease_id
            # Keys of lapsed or closed sessions are never honoured; forget them once
            # they outnumber the live sessions, so memory follows the live sessions.
            if len(self.open_keys) > 2 * len(self.sessions.leases):
                self.open_keys = {k: s for k, s in self.open_keys.items() if s in self.sessions.leases}
        return pb.OpenSessionResponse(session_id=lease.lease_id, ttl_ms=lease.ttl_ms)

    @unary("barrier", "KeepAlive")
    async def KeepAlive(
        self, request: pb.KeepAliveSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.KeepAliveSessionResponse:
        return pb.KeepAliveSessionResponse(ttl_ms=self.sessions.renew(request.session_id).ttl_ms)

    @unary("barrier", "CloseSession")
    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        self.sessions.revoke(request.session_id)
        return pb.CloseSessionResponse()

    @unary("barrier", "Wait")
    async def Wait(self, request: pb.WaitRequest, context: grpc.aio.ServicerContext) -> pb.WaitResponse:
        timeout = check_wait(request)
        if request.session_id and request.session_id not in self.sessions.leases:
            raise not_found(f"session_id: session {request.session_id!r} has lapsed or never existed")
        barrier = self.barrier(request.name)
        with missing_in_trailer(context):
            future, index = barrier.arrive(request.member_id, request.parties, request.request_id)
            try:
                async with asyncio.timeout(timeout):
                    generation = await future
            except TimeoutError:
                if future.done() and not future.cancelled() and future.exception() is None:
                    generation = future.result()  # released in the same instant
                else:
                    barrier.break_(f"member {request.member_id!r} timed out after {timeout:g}s")
                    error = barrier.broken
                    assert error is not None
                    raise BarrierBroken(grpc.StatusCode.DEADLINE_EXCEEDED, error.message, error.missing) from None
        return pb.WaitResponse(generation=generation, arrival_index=index)

    @unary("barrier", "Abort")
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        reason = check_abort(request)
        barrier = self._existing(request.name)
        barrier.break_(reason)
        return pb.AbortResponse(generation=barrier.generation)

    @unary("barrier", "Reset")
    async def Reset(self, request: pb.ResetRequest, context: grpc.aio.ServicerContext) -> pb.ResetResponse:
        return pb.ResetResponse(generation=self._existing(request.name).reset())

    @unary("barrier", "Status")
    async def Status(
        self, request: pb.BarrierStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.BarrierStatusResponse:
        barriers = [self._existing(request.name)] if request.name else [self.barriers[n] for n in sorted(self.barriers)]
        response = pb.BarrierStatusResponse()
        for b in barriers:
            response.barriers.add(
                name=b.name,
                parties=b.parties,
                generation=b.generation,
                arrived=sorted(b.arrived, key=b.arrived.__getitem__),
                missing=b.missing(),
                broken_reason=b.broken.message if b.broken else "",
                lapsed_member=b.lapsed_member,
            )
        return response
