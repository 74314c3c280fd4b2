"""The Lock gRPC service over etcd (etcd_locks.EtcdLockTable); the same answers as server.LockService."""

from __future__ import annotations

import asyncio

import grpc

from nanodist.services.common.boundary import unary
from nanodist.services.common.errors import ServiceError
from nanodist.services.common.validation import check_name
from nanodist.services.lock.etcd_locks import Entry, EtcdLockTable, WaiterLapsed
from nanodist.services.lock.server import check_acquire, check_lease_ids, check_wait_timeout
from nanodist.v1 import lock_pb2 as pb
from nanodist.v1 import lock_pb2_grpc


def _granted(entry: Entry) -> pb.AcquireResponse:
    return pb.AcquireResponse(
        acquired=True, lease_id=f"{entry.lease:016x}", fencing_token=entry.token, ttl_ms=entry.ttl_ms
    )


class EtcdLockService(lock_pb2_grpc.LockServicer):
    def __init__(self, table: EtcdLockTable) -> None:
        self.table = table

    async def _enqueue(self, request: pb.AcquireRequest) -> tuple[Entry, bool]:
        check_acquire(request)
        return await self.table.enqueue(request.name, request.owner, request.mode, request.ttl_ms, request.request_id)

    @unary("lock", "TryAcquire")
    async def TryAcquire(self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext) -> pb.AcquireResponse:
        entry, new = await self._enqueue(request)
        blocker, _ = await self.table.try_grant(request.name, entry)
        if blocker is None:
            return _granted(entry)
        if new:
            await self.table.withdraw(entry.lease)
        return pb.AcquireResponse(acquired=False)

    @unary("lock", "Acquire")
    async def Acquire(self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext) -> pb.AcquireResponse:
        timeout = check_wait_timeout(request.wait_timeout_ms, "wait_timeout_ms")
        deadline = asyncio.get_running_loop().time() + timeout
        entry, _ = await self._enqueue(request)
        while True:
            try:
                return _granted(await self._wait_for_grant(request, entry, deadline, timeout))
            except WaiterLapsed:
                # No one was granted on its behalf: it joins the queue again, at its end, for the time left.
                entry, _ = await self._enqueue(request)

    async def _wait_for_grant(self, request: pb.AcquireRequest, entry: Entry, deadline: float, timeout: float) -> Entry:
        loop = asyncio.get_running_loop()
        async with self.table.kept_alive(entry.lease, entry.ttl_ms):
            try:
                while (found := await self.table.try_grant(request.name, entry))[0] is not None:
                    blocker, revision = found
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        await self.table.withdraw(entry.lease)
                        queue, _ = await self.table.queue(request.name)
                        holders = ", ".join(e.owner for e in queue if e.holds)
                        raise ServiceError(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"lock {request.name!r} not granted within {timeout:g}s; held by {holders or 'nobody'}",
                        )
                    await self.table.wait_for_change(request.name, blocker, revision, remaining)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                await self.table.withdraw(entry.lease)  # the caller went away: leave the queue
                raise
        return entry

    @unary("lock", "Release")
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        await self.table.release(check_name(request.name, "name"), request.lease_id)
        return pb.ReleaseResponse()

    @unary("lock", "KeepAlive")
    async def KeepAlive(self, request: pb.KeepAliveRequest, context: grpc.aio.ServicerContext) -> pb.KeepAliveResponse:
        check_lease_ids(request)
        ttls = [await self.table.renew(lease_id) for lease_id in request.lease_ids]
        return pb.KeepAliveResponse(ttl_ms=min(ttls))

    @unary("lock", "Status")
    async def Status(self, request: pb.LockStatusRequest, context: grpc.aio.ServicerContext) -> pb.LockStatusResponse:
        names = [check_name(request.name, "name")] if request.name else await self.table.names()
        response = pb.LockStatusResponse()
        for name in names:
            queue, _ = await self.table.queue(name)
            state = response.locks.add(
                name=name,
                waiters=[e.owner for e in queue if not e.holds],
                last_fencing_token=await self.table.last_token(name),
            )
            for entry in (e for e in queue if e.holds):
                state.holders.add(
                    owner=entry.owner,
                    mode=entry.mode,
                    fencing_token=entry.token,
                    expires_in_ms=await self.table.etcd.time_to_live(entry.lease),
                )
        return response
