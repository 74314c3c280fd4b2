"""The Lock and KeyValue gRPC services (one server process).

With --state-dir every answer waits for `synced`: the log then holds every
change the answer reflects, the caller's own and any it read.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from nanodist.services.common.boundary import unary
from nanodist.services.common.errors import ServiceError, invalid
from nanodist.services.common.leases import check_ttl
from nanodist.services.common.validation import check_count, check_name
from nanodist.services.lock.etcd_kv import EtcdKeyValueStore
from nanodist.services.lock.kv import KeyValueStore
from nanodist.services.lock.locks import Holding, LockTable
from nanodist.v1 import lock_pb2 as pb
from nanodist.v1 import lock_pb2_grpc

DEFAULT_WAIT_MS = 60_000
MAX_WAIT_KEYS = 10_000
Synced = Callable[[], Awaitable[None]]
T = TypeVar("T")


async def in_memory() -> None:
    """Without --state-dir there is no log to wait for."""


async def settled(result: T | Awaitable[T]) -> T:
    """The embedded store answers at once, the etcd store after a round trip."""
    return await result if inspect.isawaitable(result) else result


def _check_request_id(request_id: str) -> str:
    return check_name(request_id, "request_id") if request_id else request_id


def _check_mode(mode: int) -> int:
    if mode not in pb.LockMode.values():
        raise invalid(f"mode: unknown lock mode {mode}")
    return mode


def check_acquire(request: pb.AcquireRequest) -> None:
    check_name(request.name, "name")
    check_name(request.owner, "owner")
    check_ttl(request.ttl_ms)
    _check_mode(request.mode)
    _check_request_id(request.request_id)


def check_lease_ids(request: pb.KeepAliveRequest) -> None:
    check_count(len(request.lease_ids), "lease_ids", 10_000)
    if not request.lease_ids:
        raise invalid("lease_ids: name at least one lease")


def check_wait_timeout(timeout_ms: int, field: str) -> float:
    if timeout_ms < 0:
        raise invalid(f"{field}: must be >= 0, got {timeout_ms}")
    return (timeout_ms or DEFAULT_WAIT_MS) / 1000


class LockService(lock_pb2_grpc.LockServicer):
    def __init__(self, table: LockTable, synced: Synced = in_memory) -> None:
        self.table = table
        self.synced = synced

    def _check(self, request: pb.AcquireRequest) -> None:
        check_acquire(request)
        self.table.leases.start()

    async def _granted(self, holding: Holding) -> pb.AcquireResponse:
        await self.synced()
        return pb.AcquireResponse(
            acquired=True,
            lease_id=holding.lease.lease_id,
            fencing_token=holding.token,
            ttl_ms=holding.lease.ttl_ms,
        )

    def _try(self, request: pb.AcquireRequest) -> Holding | None:
        return self.table.try_acquire(request.name, request.owner, request.mode, request.ttl_ms, request.request_id)

    @unary("lock", "TryAcquire")
    async def TryAcquire(self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext) -> pb.AcquireResponse:
        self._check(request)
        holding = self._try(request)
        if holding is None:
            await self.synced()
            return pb.AcquireResponse(acquired=False)
        return await self._granted(holding)

    @unary("lock", "Acquire")
    async def Acquire(self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext) -> pb.AcquireResponse:
        self._check(request)
        timeout = check_wait_timeout(request.wait_timeout_ms, "wait_timeout_ms")
        holding = self._try(request)
        if holding is not None:
            return await self._granted(holding)
        waiter = self.table.enqueue(request.name, request.owner, request.mode, request.ttl_ms, request.request_id)
        try:
            holding = await asyncio.wait_for(asyncio.shield(waiter.granted), timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            self.table.withdraw(request.name, waiter)
            if isinstance(exc, asyncio.CancelledError):
                raise
            holders = ", ".join(h.owner for h in self.table.locks[request.name].holders.values())
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"lock {request.name!r} not granted within {timeout:g}s; held by {holders or 'nobody'}",
            ) from None
        return await self._granted(holding)

    @unary("lock", "Release")
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        check_name(request.name, "name")
        self.table.release(request.name, request.lease_id)
        await self.synced()
        return pb.ReleaseResponse()

    @unary("lock", "KeepAlive")
    async def KeepAlive(self, request: pb.KeepAliveRequest, context: grpc.aio.ServicerContext) -> pb.KeepAliveResponse:
        check_lease_ids(request)
        leases = [self.table.leases.renew(lease_id) for lease_id in request.lease_ids]
        await self.synced()  # renewals are not logged, but the grant renewed may be that new
        return pb.KeepAliveResponse(ttl_ms=min(lease.ttl_ms for lease in leases))

    @unary("lock", "Status")
    async def Status(self, request: pb.LockStatusRequest, context: grpc.aio.ServicerContext) -> pb.LockStatusResponse:
        names = [check_name(request.name, "name")] if request.name else sorted(self.table.locks)
        response = pb.LockStatusResponse()
        for name in names:
            lock = self.table.lock(name)
            state = response.locks.add(
                name=name, waiters=[r.owner for r in lock.queue], last_fencing_token=lock.last_token
            )
            for holding in lock.holders.values():
                state.holders.add(
                    owner=holding.owner,
                    mode=holding.mode,
                    fencing_token=holding.token,
                    expires_in_ms=holding.lease.remaining_ms(),
                )
        await self.synced()
        return response


class KeyValueService(lock_pb2_grpc.KeyValueServicer):
    def __init__(self, store: KeyValueStore | EtcdKeyValueStore, synced: Synced = in_memory) -> None:
        self.store = store
        self.synced = synced

    @unary("kv", "Get")
    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext) -> pb.GetResponse:
        value = await settled(self.store.get(check_name(request.key, "key")))
        await self.synced()
        return pb.GetResponse(value=value)

    @unary("kv", "Set")
    async def Set(self, request: pb.SetRequest, context: grpc.aio.ServicerContext) -> pb.SetResponse:
        await settled(self.store.set(check_name(request.key, "key"), request.value))
        await self.synced()
        return pb.SetResponse()

    @unary("kv", "Delete")
    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        deleted = await settled(self.store.delete(check_name(request.key, "key")))
        await self.synced()
        return pb.DeleteResponse(deleted=deleted)

    @unary("kv", "CompareAndSwap")
    async def CompareAndSwap(
        self, request: pb.CompareAndSwapRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompareAndSwapResponse:
        swapped, value = await settled(
            self.store.compare_and_swap(
                check_name(request.key, "key"),
                request.expected,
                request.expect_absent,
                request.desired,
                _check_request_id(request.request_id),
            )
        )
        await self.synced()
        return pb.CompareAndSwapResponse(swapped=swapped, value=value or b"", exists=value is not None)

    @unary("kv", "Add")
    async def Add(self, request: pb.AddRequest, context: grpc.aio.ServicerContext) -> pb.AddResponse:
        key = check_name(request.key, "key")
        value = await settled(self.store.add(key, request.delta, _check_request_id(request.request_id)))
        await self.synced()
        return pb.AddResponse(value=value)

    @unary("kv", "Wait")
    async def Wait(self, request: pb.WaitKeysRequest, context: grpc.aio.ServicerContext) -> pb.WaitKeysResponse:
        if not request.keys:
            raise invalid("keys: name at least one key")
        check_count(len(request.keys), "keys", MAX_WAIT_KEYS)
        for i, key in enumerate(request.keys):
            check_name(key, f"keys[{i}]")
        await self.store.wait(list(request.keys), check_wait_timeout(request.timeout_ms, "timeout_ms"))
        await self.synced()
        return pb.WaitKeysResponse()
