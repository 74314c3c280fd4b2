"""A small asyncio client of etcd's v3 gRPC API, for the coordination services' etcd store.

`--store etcd://HOST:PORT,HOST:PORT[/NAMESPACE]` names the members; every key the services write
lives under /nanodist/NAMESPACE/ (NAMESPACE defaults to "default"), so several clusters can share one
etcd. A call that finds its member unreachable moves to the next one; reads are retried there, writes
are not (one may have been applied), so the caller sees UNAVAILABLE and retries the idempotent ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import grpc

from nanodist.services.common.errors import ConfigurationError, ServiceError, exhausted
from nanodist.settings import env_default

try:
    from nanodist.etcd import kv_pb2, rpc_pb2, rpc_pb2_grpc
except ImportError:  # generated at build time: `make etcd`
    kv_pb2 = rpc_pb2 = rpc_pb2_grpc = None  # type: ignore[assignment]

T = TypeVar("T")
CALL_TIMEOUT = 10.0  # seconds for one request to etcd; a quorum that takes longer is as good as lost


class LeaseLapsed(ServiceError):
    """etcd refused a write attached to a lease that no longer exists: it lapsed (its process was
    frozen or cut off past its TTL) or was revoked. Nothing of the refused transaction was applied."""


@dataclass(frozen=True)
class EtcdAddress:
    endpoints: tuple[str, ...]
    namespace: str

    @property
    def prefix(self) -> bytes:
        return f"/nanodist/{self.namespace}/".encode()


def add_store_argument(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument(
        "--store",
        default=env_default("store", "embedded"),
        help=f"where the {role} state lives: 'embedded' (this process) or etcd://HOST:PORT,HOST:PORT[/NAMESPACE], "
        "shared by any number of replicas (env NANODIST_STORE; docs/coordination.md)",
    )


def parse_store(url: str) -> EtcdAddress:
    """etcd://HOST:PORT,HOST:PORT[/NAMESPACE] -> its members and namespace."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise ConfigurationError(f"--store {url!r}: expected 'embedded' or etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]")
    endpoints = tuple(e.strip() for e in parts.netloc.split(","))
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(f"--store {url!r}: {endpoint!r} is not HOST:PORT")
    namespace = parts.path.strip("/") or "default"
    if not namespace.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigurationError(f"--store {url!r}: namespace {namespace!r} must be letters, digits, '-', '_' or '.'")
    if rpc_pb2 is None:
        raise ConfigurationError("--store etcd: the etcd stubs are not generated; run `make etcd`")
    return EtcdAddress(endpoints, namespace)


def put_op(key: bytes, value: bytes, lease: int = 0) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))


def read_op(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))


def absent(key: bytes) -> rpc_pb2.Compare:
    """A transaction's condition that key does not exist."""
    return rpc_pb2.Compare(key=key, target=rpc_pb2.Compare.CREATE, result=rpc_pb2.Compare.EQUAL, create_revision=0)


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with prefix."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class Etcd:
    """Channels to every member; calls go to the current one and move on when it is unreachable."""

    def __init__(self, address: EtcdAddress) -> None:
        self.address = address
        self._channels = [grpc.aio.insecure_channel(e) for e in address.endpoints]
        self._current = 0

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    @property
    def _channel(self) -> grpc.aio.Channel:
        return self._channels[self._current]

    def kv(self) -> rpc_pb2_grpc.KVStub:
        return rpc_pb2_grpc.KVStub(self._channel)

    def lease(self) -> rpc_pb2_grpc.LeaseStub:
        return rpc_pb2_grpc.LeaseStub(self._channel)

    def watcher(self) -> rpc_pb2_grpc.WatchStub:
        return rpc_pb2_grpc.WatchStub(self._channel)

    async def call(self, attempt: Callable[[], Awaitable[T]], *, read: bool) -> T:
        """Run one request; on an unreachable member move to the next, and retry there if it only reads."""
        tries = len(self._channels) if read else 1
        for tried in range(tries):
            try:
                return await attempt()
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise exhausted(f"etcd refused a write: {error.details()}") from None
                if error.code() == grpc.StatusCode.NOT_FOUND and "lease not found" in (error.details() or ""):
                    raise LeaseLapsed(grpc.StatusCode.NOT_FOUND, f"etcd: {error.details()}") from None
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise ServiceError(grpc.StatusCode.INTERNAL, f"etcd refused a request: {error.details()}") from None
                failed = self.address.endpoints[self._current]
                self._current = (self._current + 1) % len(self._channels)
                if tried == tries - 1:
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE, f"etcd member {failed} unreachable: {error.details()}"
                    ) from None
        raise AssertionError("unreachable")

    async def get(self, key: bytes) -> kv_pb2.KeyValue | None:
        response = await self.call(
            lambda: self.kv().Range(rpc_pb2.RangeRequest(key=key), timeout=CALL_TIMEOUT), read=True
        )
        return response.kvs[0] if response.kvs else None

    async def range(self, prefix: bytes, *, by_creation: bool = False) -> tuple[list[kv_pb2.KeyValue], int]:
        """Every key under prefix (in key order, or oldest first), and the revision they were read at."""
        request = rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        if by_creation:
            request.sort_target = rpc_pb2.RangeRequest.CREATE
            request.sort_order = rpc_pb2.RangeRequest.ASCEND
        response = await self.call(lambda: self.kv().Range(request, timeout=CALL_TIMEOUT), read=True)
        return list(response.kvs), response.header.revision

    async def revision(self) -> int:
        response = await self.call(
            lambda: self.kv().Range(rpc_pb2.RangeRequest(key=b"\0", limit=1), timeout=CALL_TIMEOUT), read=True
        )
        return int(response.header.revision)

    async def txn(self, request: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        return await self.call(lambda: self.kv().Txn(request, timeout=CALL_TIMEOUT), read=False)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        request = rpc_pb2.PutRequest(key=key, value=value, lease=lease)
        await self.call(lambda: self.kv().Put(request, timeout=CALL_TIMEOUT), read=False)

    async def delete(self, key: bytes) -> int:
        request = rpc_pb2.DeleteRangeRequest(key=key)
        response = await self.call(lambda: self.kv().DeleteRange(request, timeout=CALL_TIMEOUT), read=False)
        return int(response.deleted)

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: its id and the TTL etcd granted (it may raise a short one to its minimum)."""
        request = rpc_pb2.LeaseGrantRequest(TTL=ttl_s)
        response = await self.call(lambda: self.lease().LeaseGrant(request, timeout=CALL_TIMEOUT), read=False)
        if response.error:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"etcd granted no lease: {response.error}")
        return int(response.ID), int(response.TTL)

    async def keep_alive(self, lease_id: int) -> int:
        """Renew a lease once; its TTL, or 0 if it has lapsed."""

        async def renew() -> int:
            call = self.lease().LeaseKeepAlive(timeout=CALL_TIMEOUT)
            await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease_id))
            response = await call.read()
            call.cancel()
            return 0 if response is grpc.aio.EOF else int(response.TTL)

        return await self.call(renew, read=True)  # renewing twice is harmless

    async def revoke(self, lease_id: int) -> bool:
        """End a lease and delete its keys; False if it had already lapsed."""
        request = rpc_pb2.LeaseRevokeRequest(ID=lease_id)
        try:
            await self.call(lambda: self.lease().LeaseRevoke(request, timeout=CALL_TIMEOUT), read=False)
        except LeaseLapsed:
            return False
        return True

    async def time_to_live(self, lease_id: int) -> int:
        """Milliseconds left on a lease (0 if it has lapsed; etcd counts whole seconds)."""
        request = rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id)
        response = await self.call(lambda: self.lease().LeaseTimeToLive(request, timeout=CALL_TIMEOUT), read=True)
        return max(0, int(response.TTL)) * 1000

    @contextlib.asynccontextmanager
    async def watch(
        self, key: bytes, start_revision: int, *, prefix: bool = False, prev_kv: bool = False
    ) -> AsyncIterator[asyncio.Queue[kv_pb2.Event | None]]:
        """Events on key (or every key under it) from start_revision on, each with the value before it
        if prev_kv. An event is a hint to read again, never the state itself; a broken watch puts None."""
        events: asyncio.Queue[kv_pb2.Event | None] = asyncio.Queue()
        create = rpc_pb2.WatchCreateRequest(key=key, start_revision=start_revision, prev_kv=prev_kv)
        if prefix:
            create.range_end = prefix_end(key)
        call = self.watcher().Watch()

        async def pump() -> None:
            try:
                await call.write(rpc_pb2.WatchRequest(create_request=create))
                async for response in call:
                    if response.canceled or response.compact_revision:
                        break
                    for event in response.events:
                        events.put_nowait(event)
            except grpc.aio.AioRpcError:
                pass
            events.put_nowait(None)

        task = asyncio.create_task(pump())
        try:
            yield events
        finally:
            task.cancel()
            call.cancel()


class LongLease:
    """One lease of `ttl_s` seconds that this replica renews in the background, for records that must
    outlive a call but not the replica's need of them (request ids, released leases): granted on first
    need, and again if it was lost (revoked, or lapsed while this replica was frozen)."""

    def __init__(self, etcd: Etcd, ttl_s: int) -> None:
        self.etcd = etcd
        self.ttl_s = ttl_s
        self._lease = 0
        self._lock = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None

    async def _id(self) -> int:
        async with self._lock:
            if not self._lease or self._renewer is None or self._renewer.done():
                self._lease, _ = await self.etcd.grant(self.ttl_s)
                self._renewer = asyncio.create_task(self._renew(self._lease))
            return self._lease

    async def _renew(self, lease: int) -> None:
        while await self.etcd.keep_alive(lease) > 0:
            await asyncio.sleep(self.ttl_s / 6)

    async def txn(self, txn: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        """Run `txn`, whose last success op is a put under this lease."""
        txn.success[-1].request_put.lease = await self._id()
        try:
            return await self.etcd.txn(txn)
        except LeaseLapsed:
            await self.close()
            txn.success[-1].request_put.lease = await self._id()
            return await self.etcd.txn(txn)

    async def close(self) -> None:
        async with self._lock:
            self._lease = 0
            if self._renewer is not None:
                self._renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError, ServiceError):
                    await self._renewer
