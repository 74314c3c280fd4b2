"""The Lock service on etcd: FIFO locks with leases and fencing tokens, kept entirely in etcd.

Layout under <prefix>lock/<name>#/ ('#' never occurs in a name, so one lock's keys are never under
another's prefix):
- q#<lease>: one key per holder or waiter, attached to its etcd lease (the lock's lease), valued
  {owner, mode, ttl_ms, token}; token 0 while it waits. Its create revision is its place in the queue.
- token: the last fencing token granted for the name; never deleted.
A request id maps to its lease under <prefix>lock-request/<id>, attached to the same lease. A lease its
holder released is remembered under <prefix>lock-released/<lease> for an hour, so that a Release
retried after its answer was lost is answered OK.

A waiter is granted once no key ahead of it excludes it (every key ahead for an exclusive waiter,
the exclusive ones for a shared waiter). It watches only the nearest such key and reads again when
that key changes: a watch event is a hint, the queue as read is the decision. The grant is one
transaction that checks the waiter's key still exists and that nobody granted a token meanwhile.
Tokens are max(last + 1, the wall clock in microseconds): above any the embedded store gave before
a switch (it starts from the same clock), and strictly growing per name whatever the replicas' clocks.
The replica serving a waiter renews its lease until the grant; then the holder's KeepAlives do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from nanodist.etcd import kv_pb2, rpc_pb2
from nanodist.services.common.errors import ServiceError, failed_precondition, invalid, not_found
from nanodist.services.common.etcd import Etcd, LeaseLapsed, LongLease, absent, put_op
from nanodist.v1 import lock_pb2 as pb

Compare = rpc_pb2.Compare
RELEASED_TTL_S = 3600  # how long a released lease is remembered, for a retried Release


class WaiterLapsed(ServiceError):
    """A waiter's lease lapsed before its grant (the replica renewing it was frozen or cut off)."""


@dataclass
class Entry:
    """A holder or waiter as read from its key."""

    lease: int
    owner: str
    mode: int
    ttl_ms: int
    token: int
    create_revision: int

    @property
    def holds(self) -> bool:
        return self.token > 0

    @property
    def exclusive(self) -> bool:
        return self.mode != pb.SHARED


class EtcdLockTable:
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self._locks = etcd.address.prefix + b"lock/"
        self._requests = etcd.address.prefix + b"lock-request/"
        self._released = etcd.address.prefix + b"lock-released/"
        self.released_lease = LongLease(etcd, RELEASED_TTL_S)

    def _prefix(self, name: str) -> bytes:
        return self._locks + name.encode() + b"#/"

    def _entry_key(self, name: str, lease: int) -> bytes:
        return self._prefix(name) + b"q#" + f"{lease:016x}".encode()

    def _token_key(self, name: str) -> bytes:
        return self._prefix(name) + b"token"

    @staticmethod
    def _entry(kv: kv_pb2.KeyValue) -> Entry:
        value = json.loads(kv.value)
        lease = int(kv.key.rsplit(b"q#", 1)[1], 16)
        return Entry(lease, value["owner"], value["mode"], value["ttl_ms"], value["token"], kv.create_revision)

    async def queue(self, name: str) -> tuple[list[Entry], int]:
        """Holders and waiters oldest first, and the revision they were read at."""
        kvs, revision = await self.etcd.range(self._prefix(name) + b"q#", by_creation=True)
        return [self._entry(kv) for kv in kvs], revision

    async def last_token(self, name: str) -> int:
        found = await self.etcd.get(self._token_key(name))
        return int(found.value) if found else 0

    async def names(self) -> list[str]:
        kvs, _ = await self.etcd.range(self._locks)
        return sorted({kv.key[len(self._locks) :].split(b"#/", 1)[0].decode() for kv in kvs})

    # --- joining the queue --------------------------------------------------------------------

    async def enqueue(self, name: str, owner: str, mode: int, ttl_ms: int, request_id: str) -> tuple[Entry, bool]:
        """This request's entry (an earlier one for a retried request id whose lease lives), and
        whether it is new."""
        if request_id:
            earlier = await self._earlier(name, request_id)
            if earlier is not None:
                return earlier, False
        lease, granted_ttl_s = await self.etcd.grant(max(1, -(-ttl_ms // 1000)))
        ttl = granted_ttl_s * 1000
        key = self._entry_key(name, lease)
        value = json.dumps({"owner": owner, "mode": mode, "ttl_ms": ttl, "token": 0}).encode()
        txn = rpc_pb2.TxnRequest(success=[put_op(key, value, lease)])
        if request_id:
            remembered = self._requests + request_id.encode()
            txn.compare.append(absent(remembered))
            txn.success.append(put_op(remembered, json.dumps([name, lease]).encode(), lease))
        try:
            written = await self.etcd.txn(txn)
        except LeaseLapsed:  # this replica stalled past the TTL between the grant and the write: try anew
            return await self.enqueue(name, owner, mode, ttl_ms, request_id)
        if not written.succeeded:  # the same request id raced in through another replica
            await self.etcd.revoke(lease)
            return await self.enqueue(name, owner, mode, ttl_ms, request_id)
        # A transaction's writes all carry its revision: the key's create revision, its place in the queue.
        return Entry(lease, owner, mode, ttl, 0, int(written.header.revision)), True

    async def _earlier(self, name: str, request_id: str) -> Entry | None:
        found = await self.etcd.get(self._requests + request_id.encode())
        if found is None:
            return None
        first_name, lease = json.loads(found.value)
        if first_name != name:
            raise invalid(f"request_id: {request_id!r} was already used for lock {first_name!r}")
        entry = await self.etcd.get(self._entry_key(name, lease))
        return self._entry(entry) if entry is not None else None

    # --- being granted ------------------------------------------------------------------------

    @staticmethod
    def blocker(queue: list[Entry], mine: Entry) -> Entry | None:
        """The nearest entry ahead of mine that keeps it from being granted, if any."""
        ahead = [e for e in queue if e.create_revision < mine.create_revision]
        blocking = ahead if mine.exclusive else [e for e in ahead if e.exclusive]
        return blocking[-1] if blocking else None

    async def try_grant(self, name: str, mine: Entry) -> tuple[Entry | None, int]:
        """Grant mine if nothing ahead blocks it: (None, revision) once granted (mine.token set), else
        (the blocker to wait for, the revision the queue was read at)."""
        while True:
            queue, revision = await self.queue(name)
            current = next((e for e in queue if e.lease == mine.lease), None)
            if current is None:
                raise WaiterLapsed(
                    grpc.StatusCode.ABORTED, f"lock {name!r}: the lease of this request lapsed while it waited"
                )
            if current.holds:
                mine.token = current.token
                return None, revision
            blocking = self.blocker(queue, current)
            if blocking is not None:
                return blocking, revision
            if await self._grant(name, current):
                mine.token = current.token
                return None, revision

    async def _grant(self, name: str, entry: Entry) -> bool:
        token_key, key = self._token_key(name), self._entry_key(name, entry.lease)
        found = await self.etcd.get(token_key)
        last = int(found.value) if found else 0
        token = max(last + 1, time.time_ns() // 1000)
        unchanged = (
            Compare(key=token_key, target=Compare.MOD, result=Compare.EQUAL, mod_revision=found.mod_revision)
            if found
            else absent(token_key)
        )
        still_queued = Compare(
            key=key, target=Compare.CREATE, result=Compare.EQUAL, create_revision=entry.create_revision
        )
        value = json.dumps({"owner": entry.owner, "mode": entry.mode, "ttl_ms": entry.ttl_ms, "token": token})
        txn = rpc_pb2.TxnRequest(
            compare=[unchanged, still_queued],
            success=[put_op(token_key, str(token).encode()), put_op(key, value.encode(), entry.lease)],
        )
        try:
            written = (await self.etcd.txn(txn)).succeeded
        except LeaseLapsed:
            written = False  # it lapsed after the compare was read true: its key is going
        if not written:
            return False  # another grant took a token, or this lease lapsed: read the queue again
        entry.token = token
        return True

    async def wait_for_change(self, name: str, blocker: Entry, revision: int, timeout: float) -> None:
        """Until the blocker's key changes after `revision` (or timeout seconds pass)."""
        async with self.etcd.watch(self._entry_key(name, blocker.lease), revision + 1) as events:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(events.get(), timeout)

    @contextlib.asynccontextmanager
    async def kept_alive(self, lease: int, ttl_ms: int) -> AsyncIterator[None]:
        """Renew a waiter's lease while its request is served here."""

        async def renew() -> None:  # the lease was granted just now: the first renewal is a third of it away
            while True:
                await asyncio.sleep(ttl_ms / 3000)
                if await self.etcd.keep_alive(lease) <= 0:
                    return

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServiceError):
                await task

    # --- leaving --------------------------------------------------------------------------------

    async def release(self, name: str, lease_id: str) -> None:
        lease = parse_lease(lease_id)
        found = await self.etcd.get(self._entry_key(name, lease)) if lease is not None else None
        if found is None or not self._entry(found).holds:
            earlier = await self.etcd.get(self._released + lease_id.encode()) if lease is not None else None
            if earlier is not None and earlier.value == name.encode():
                return  # released by an earlier try of this call
            raise failed_precondition(f"lease {lease_id!r} does not hold lock {name!r}")
        # Remembered for an hour, so that a retry whose first answer was lost is answered as it was.
        await self.released_lease.txn(
            rpc_pb2.TxnRequest(success=[put_op(self._released + lease_id.encode(), name.encode())])
        )
        await self.etcd.revoke(lease)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self.released_lease.close()

    async def withdraw(self, lease: int) -> None:
        with contextlib.suppress(ServiceError):
            await self.etcd.revoke(lease)

    async def renew(self, lease_id: str) -> int:
        lease = parse_lease(lease_id)
        ttl_s = await self.etcd.keep_alive(lease) if lease is not None else 0
        if ttl_s <= 0:
            raise not_found(f"lease {lease_id!r} has lapsed or never existed")
        return ttl_s * 1000


def parse_lease(lease_id: str) -> int | None:
    try:
        lease = int(lease_id, 16)
    except ValueError:
        return None
    return lease if len(lease_id) == 16 and lease > 0 else None
