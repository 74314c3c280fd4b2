"""Named locks: FIFO grants, shared and exclusive modes, leases and fencing tokens."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nanodist.services.common.durable import fsync_dir
from nanodist.services.common.errors import exhausted, failed_precondition, invalid
from nanodist.services.common.leases import Lease, LeaseTable
from nanodist.services.lock import records
from nanodist.v1 import lock_pb2 as pb

log = logging.getLogger("nanodist.lock")
TOKEN_BLOCK = 1_000_000
MAX_LOCKS = 100_000  # lock names
MAX_PER_OWNER = 1_000  # locks one owner holds or waits for
KEEP_RELEASED = 4096  # released leases remembered, so that a retried Release is answered OK


class FencingTokens:
    """Tokens that only grow, across restarts too.

    With a state directory, the service persists a ceiling a block ahead of
    the tokens it hands out (one fsync per block) and restarts from it. Either
    way a restart also starts no lower than the wall clock in microseconds.
    """

    def __init__(self, state_dir: str | None) -> None:
        self.path = os.path.join(state_dir, "fencing-ceiling") if state_dir else None
        start = time.time_ns() // 1000
        if self.path and os.path.exists(self.path):
            with open(self.path) as f:
                start = max(start, int(f.read().strip() or 0))
        self.last = start
        self.ceiling = start
        if self.path is None:
            log.warning("no --state-dir: fencing tokens after a restart rely on the wall clock moving forward")

    def next(self) -> int:
        self.last += 1
        if self.path and self.last >= self.ceiling:
            self._persist(self.last + TOKEN_BLOCK)
        return self.last

    def _persist(self, ceiling: int) -> None:
        assert self.path is not None
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(ceiling))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(os.path.dirname(self.path))
        self.ceiling = ceiling

    def at_least(self, token: int) -> None:
        """Never hand out `token` or anything below it (a grant restored from the log holds it)."""
        self.last = max(self.last, token)


@dataclass
class Holding:
    """A granted lock: its lease, and what the lease was granted for."""

    lease: Lease
    lock: str
    owner: str
    mode: int
    token: int
    request_id: str = ""  # the AcquireRequest's, so that a retry gets this grant back

    def record(self) -> bytes:
        """The GRANT record that restores this holding after a restart."""
        return records.to_json(
            {
                "lock": self.lock,
                "lease_id": self.lease.lease_id,
                "owner": self.owner,
                "mode": self.mode,
                "token": self.token,
                "ttl_ms": self.lease.ttl_ms,
                "request_id": self.request_id,
            }
        )


@dataclass
class Request:
    owner: str
    mode: int
    ttl_ms: int
    granted: asyncio.Future[Holding]
    request_id: str = ""


@dataclass
class NamedLock:
    name: str
    holders: dict[str, Holding] = field(default_factory=dict)  # lease id -> grant
    queue: deque[Request] = field(default_factory=deque)
    last_token: int = 0

    def compatible(self, mode: int) -> bool:
        if not self.holders:
            return True
        return mode == pb.SHARED and all(h.mode == pb.SHARED for h in self.holders.values())


class LockTable:
    """Every lock, its holders and its queue. Grants and lease ends are handed to `journal` as they
    happen, so that held locks survive a restart; queued requests are not (their callers retry)."""

    def __init__(self, tokens: FencingTokens) -> None:
        self.locks: dict[str, NamedLock] = {}
        self.leases = LeaseTable()
        self.holdings: dict[str, Holding] = {}  # lease id -> grant, for the lapse callback
        self.by_request: dict[str, Holding] = {}  # AcquireRequest.request_id -> its live grant
        self.tokens = tokens
        self.per_owner: Counter[str] = Counter()  # grants held plus requests queued
        self.journal: records.Journal = records.unlogged
        # Leases their holders released, newest last: a Release retried after its answer was lost (the
        # service restarted in between) is answered as the first was, not as a lapse.
        self.released: OrderedDict[str, str] = OrderedDict()

    def lock(self, name: str) -> NamedLock:
        lock = self.locks.get(name)
        if lock is None:
            if len(self.locks) >= MAX_LOCKS:
                raise exhausted(f"name: {len(self.locks)} locks exist, the limit of this server ({MAX_LOCKS})")
            lock = self.locks[name] = NamedLock(name)
        return lock

    def _check_owner(self, owner: str) -> None:
        if self.per_owner[owner] >= MAX_PER_OWNER:
            raise exhausted(
                f"owner: {owner!r} holds or waits for {self.per_owner[owner]} locks (limit {MAX_PER_OWNER})"
            )

    def _forget(self, owner: str) -> None:
        self.per_owner[owner] -= 1
        if self.per_owner[owner] <= 0:
            del self.per_owner[owner]

    def _hold(self, lock: NamedLock, holding: Holding) -> None:
        self.per_owner[holding.owner] += 1
        lock.last_token = max(lock.last_token, holding.token)
        lock.holders[holding.lease.lease_id] = self.holdings[holding.lease.lease_id] = holding
        if holding.request_id:
            self.by_request[holding.request_id] = holding

    def _grant(self, lock: NamedLock, owner: str, mode: int, ttl_ms: int, request_id: str) -> Holding:
        lease = self.leases.grant(ttl_ms, self._lapsed)
        holding = Holding(lease, lock.name, owner, mode, self.tokens.next(), request_id)
        self._hold(lock, holding)
        self.journal(records.GRANT, holding.record())
        return holding

    def _end(self, lock: NamedLock, lease_id: str) -> Holding | None:
        """Forget a holding whose lease is over (released, lapsed, or withdrawn)."""
        holding = lock.holders.pop(lease_id, None)
        self.holdings.pop(lease_id, None)
        if holding is None:
            return None
        self._forget(holding.owner)
        if self.by_request.get(holding.request_id) is holding:
            del self.by_request[holding.request_id]
        self.journal(records.RELEASE, pb.ReleaseRequest(name=lock.name, lease_id=lease_id).SerializeToString())
        return holding

    def granted_before(self, name: str, request_id: str) -> Holding | None:
        """The live grant an earlier request with this id received (its response was lost), if any."""
        holding = self.by_request.get(request_id) if request_id else None
        if holding is not None and holding.lock != name:
            raise invalid(f"request_id: {request_id!r} was already granted lock {holding.lock!r}")
        return holding

    def try_acquire(self, name: str, owner: str, mode: int, ttl_ms: int, request_id: str = "") -> Holding | None:
        """Grant at once if nobody queues ahead and the holders are compatible (FIFO fairness)."""
        earlier = self.granted_before(name, request_id)
        if earlier is not None:
            return earlier
        self._check_owner(owner)
        lock = self.lock(name)
        if lock.queue or not lock.compatible(mode):
            return None
        return self._grant(lock, owner, mode, ttl_ms, request_id)

    def enqueue(self, name: str, owner: str, mode: int, ttl_ms: int, request_id: str = "") -> Request:
        self._check_owner(owner)
        request = Request(owner, mode, ttl_ms, asyncio.get_running_loop().create_future(), request_id)
        self.lock(name).queue.append(request)
        self.per_owner[owner] += 1
        return request

    def withdraw(self, name: str, request: Request) -> None:
        """Drop a waiter that gave up; if it was granted meanwhile, release that grant."""
        lock = self.locks[name]
        if request in lock.queue:
            lock.queue.remove(request)
            self._forget(request.owner)
        elif request.granted.done() and not request.granted.cancelled():
            self.release(name, request.granted.result().lease.lease_id)
        self._advance(lock)

    def release(self, name: str, lease_id: str) -> None:
        lock = self.locks.get(name)
        if lock is None or lease_id not in lock.holders:
            if self.released.get(lease_id) == name:
                return  # released by an earlier try of this call
            raise failed_precondition(f"lease {lease_id!r} does not hold lock {name!r}")
        self._end(lock, lease_id)
        self.leases.revoke(lease_id)
        self._remember_release(lease_id, name)
        self.journal(records.RELEASED, pb.ReleaseRequest(name=name, lease_id=lease_id).SerializeToString())
        self._advance(lock)

    def _remember_release(self, lease_id: str, name: str) -> None:
        self.released[lease_id] = name
        if len(self.released) > KEEP_RELEASED:
            self.released.popitem(last=False)

    def _lapsed(self, lease: Lease) -> None:
        holding = self.holdings.get(lease.lease_id)
        if holding is None:
            return
        lock = self.locks[holding.lock]
        if self._end(lock, lease.lease_id) is not None:
            log.warning("lease of %s on lock %s lapsed", holding.owner, lock.name)
            self._advance(lock)

    def replay(self, kind: int, payload: bytes) -> None:
        """Apply a logged grant, lease end or release again. A restored lease gets its whole TTL from now:
        its holder could not renew it while the service was down."""
        if kind == records.GRANT:
            grant: dict[str, Any] = records.from_json(payload)
            lease = self.leases.restore(grant["lease_id"], grant["ttl_ms"], self._lapsed)
            holding = Holding(lease, grant["lock"], grant["owner"], grant["mode"], grant["token"], grant["request_id"])
            self._hold(self.lock(holding.lock), holding)
            self.tokens.at_least(holding.token)
        elif kind == records.RELEASED:
            released = pb.ReleaseRequest.FromString(payload)
            self._remember_release(released.lease_id, released.name)
        elif kind == records.RELEASE:
            end = pb.ReleaseRequest.FromString(payload)
            lock = self.locks.get(end.name)
            if lock is not None:
                self._end(lock, end.lease_id)
            self.leases.revoke(end.lease_id)

    def snapshot(self) -> Iterator[tuple[int, bytes]]:
        """The held locks as GRANT records, encoded now (holdings change after a snapshot is taken)."""
        grants = [(records.GRANT, holding.record()) for holding in self.holdings.values()]
        releases = [
            (records.RELEASED, pb.ReleaseRequest(name=name, lease_id=lease_id).SerializeToString())
            for lease_id, name in self.released.items()
        ]
        return iter(grants + releases)

    def _advance(self, lock: NamedLock) -> None:
        """Grant queued requests in order while they are compatible with the holders."""
        while lock.queue and lock.compatible(lock.queue[0].mode):
            request = lock.queue.popleft()
            self._forget(request.owner)
            if request.granted.done():  # the waiter already gave up
                continue
            request.granted.set_result(
                self._grant(lock, request.owner, request.mode, request.ttl_ms, request.request_id)
            )
