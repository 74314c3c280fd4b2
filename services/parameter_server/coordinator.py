"""The calls a replicated shard makes to the lock service (its coordinator): a lock with a lease, and
one record in the key-value store. "HOST:PORT,HOST:PORT" names replicas of the lock service (on
etcd); a call that finds one unreachable moves to the next and is retried there, which every call
here allows (Acquire and CompareAndSwap carry request ids; the others are idempotent).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from nanodist.services.common.errors import ServiceError
from nanodist.v1 import lock_pb2 as pb
from nanodist.v1 import lock_pb2_grpc

T = TypeVar("T")
MOVE_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CALL_TIMEOUT = 10.0
WAIT_FOR_LOCK_S = 3600.0  # one Acquire's wait; the replica waits again after it


class Coordinator:
    def __init__(self, addresses: str) -> None:
        self.addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        self._channels = [grpc.aio.insecure_channel(a) for a in self.addresses]
        self._current = 0

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _call(self, attempt: Callable[[grpc.aio.Channel], Awaitable[T]], within: float = CALL_TIMEOUT) -> T:
        """Retry on the next replica, with a growing pause, until `within` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        pause = 0.05
        while True:
            try:
                return await attempt(self._channels[self._current])
            except grpc.aio.AioRpcError as error:
                if error.code() not in MOVE_ON:
                    raise
                self._current = (self._current + 1) % len(self._channels)
                if loop.time() + pause >= deadline:
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE, f"the coordinator {','.join(self.addresses)} is unreachable"
                    ) from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    async def acquire(self, name: str, owner: str, ttl: float) -> pb.AcquireResponse:
        """Wait in line for the lock, however long it takes (through outages of the coordinator)."""
        request = pb.AcquireRequest(
            name=name,
            owner=owner,
            ttl_ms=int(ttl * 1000),
            wait_timeout_ms=int(WAIT_FOR_LOCK_S * 1000),
            request_id=uuid.uuid4().hex,
        )
        while True:
            try:
                return await self._call(
                    lambda c: lock_pb2_grpc.LockStub(c).Acquire(request, timeout=WAIT_FOR_LOCK_S + CALL_TIMEOUT),
                    within=WAIT_FOR_LOCK_S,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            except ServiceError:
                await asyncio.sleep(1.0)  # unreachable for an hour: keep waiting
            request.request_id = uuid.uuid4().hex

    async def keep_alive(self, lease_id: str, timeout: float = CALL_TIMEOUT) -> bool | None:
        """Renew a lease: True, False if it has lapsed, None if the coordinator could not be reached."""
        request = pb.KeepAliveRequest(lease_ids=[lease_id])
        try:
            await self._call(lambda c: lock_pb2_grpc.LockStub(c).KeepAlive(request, timeout=timeout), within=timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        except ServiceError:
            return None
        return True

    async def release(self, name: str, lease_id: str) -> None:
        request = pb.ReleaseRequest(name=name, lease_id=lease_id)
        try:
            await self._call(lambda c: lock_pb2_grpc.LockStub(c).Release(request, timeout=CALL_TIMEOUT))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # it lapsed meanwhile: released all the same
                raise

    async def get(self, key: str) -> bytes | None:
        request = pb.GetRequest(key=key)
        try:
            response = await self._call(lambda c: lock_pb2_grpc.KeyValueStub(c).Get(request, timeout=CALL_TIMEOUT))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return bytes(response.value)

    async def compare_and_swap(self, key: str, expected: bytes | None, desired: bytes) -> bool:
        request = pb.CompareAndSwapRequest(
            key=key,
            expected=expected or b"",
            expect_absent=expected is None,
            desired=desired,
            request_id=uuid.uuid4().hex,
        )
        response = await self._call(
            lambda c: lock_pb2_grpc.KeyValueStub(c).CompareAndSwap(request, timeout=CALL_TIMEOUT)
        )
        return bool(response.swapped)
