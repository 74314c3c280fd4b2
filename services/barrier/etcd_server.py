"""The Barrier gRPC service over etcd (etcd_barriers.EtcdBarriers); the same answers as server.BarrierService."""

from __future__ import annotations

import grpc

from nanodist.services.barrier.etcd_barriers import EtcdBarriers
from nanodist.services.barrier.server import check_abort, check_open, check_wait, missing_in_trailer
from nanodist.services.barrier.state import BarrierBroken
from nanodist.services.common.boundary import unary
from nanodist.services.common.errors import not_found
from nanodist.services.common.validation import check_name
from nanodist.v1 import barrier_pb2 as pb
from nanodist.v1 import barrier_pb2_grpc


class EtcdBarrierService(barrier_pb2_grpc.BarrierServicer):
    def __init__(self, barriers: EtcdBarriers) -> None:
        self.barriers = barriers

    @unary("barrier", "OpenSession")
    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        check_open(request)
        session_id, ttl_ms = await self.barriers.open_session(
            request.member_id, request.ttl_ms, list(request.barriers), request.idempotency_key
        )
        return pb.OpenSessionResponse(session_id=session_id, ttl_ms=ttl_ms)

    @unary("barrier", "KeepAlive")
    async def KeepAlive(
        self, request: pb.KeepAliveSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.KeepAliveSessionResponse:
        return pb.KeepAliveSessionResponse(ttl_ms=await self.barriers.keep_alive(request.session_id))

    @unary("barrier", "CloseSession")
    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseSessionResponse:
        await self.barriers.close_session(request.session_id)
        return pb.CloseSessionResponse()

    @unary("barrier", "Wait")
    async def Wait(self, request: pb.WaitRequest, context: grpc.aio.ServicerContext) -> pb.WaitResponse:
        timeout = check_wait(request)
        if request.session_id and await self.barriers.session(request.session_id) is None:
            raise not_found(f"session_id: session {request.session_id!r} has lapsed or never existed")
        member, name = request.member_id, request.name
        with missing_in_trailer(context):
            (index, generation, released), _ = await self.barriers.change(
                name, lambda record: record.arrive(member, request.parties, request.request_id), create=True
            )
            outcome = True if released else await self.barriers.settled(name, generation, timeout)
            if outcome is False:  # this waiter's timeout breaks the generation, unless it ended meanwhile
                reason = f"member {member!r} timed out after {timeout:g}s"
                await self.barriers.change(
                    name, lambda r: r.generation == generation and r.break_(reason), create=False
                )
                record, _ = await self.barriers.read(name)
                outcome = record.outcome(generation)
                if isinstance(outcome, BarrierBroken):
                    raise BarrierBroken(grpc.StatusCode.DEADLINE_EXCEEDED, outcome.message, outcome.missing)
            if isinstance(outcome, BarrierBroken):
                raise outcome
        return pb.WaitResponse(generation=generation, arrival_index=index)

    @unary("barrier", "Abort")
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        reason = check_abort(request)
        _, record = await self.barriers.change(request.name, lambda r: r.break_(reason), create=False)
        return pb.AbortResponse(generation=record.generation)

    @unary("barrier", "Reset")
    async def Reset(self, request: pb.ResetRequest, context: grpc.aio.ServicerContext) -> pb.ResetResponse:
        generation, _ = await self.barriers.change(check_name(request.name, "name"), lambda r: r.reset(), create=False)
        return pb.ResetResponse(generation=generation)

    @unary("barrier", "Status")
    async def Status(
        self, request: pb.BarrierStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.BarrierStatusResponse:
        if request.name:
            records = [(await self.barriers.read(check_name(request.name, "name")))[0]]
        else:
            records = sorted(await self.barriers.all(), key=lambda r: r.name)
        response = pb.BarrierStatusResponse()
        for r in records:
            response.barriers.add(
                name=r.name,
                parties=r.parties,
                generation=r.generation,
                arrived=sorted(r.arrived, key=r.arrived.__getitem__),
                missing=r.missing(),
                broken_reason=r.broken[0] if r.broken else "",
                lapsed_member=r.lapsed_member,
            )
        return response
