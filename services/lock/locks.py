"""Named locks: FIFO grants, shared and exclusive modes, leases and fencing tokens."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from nanodist.services.common.durable import fsync_dir
from nanodist.services.common.errors import exhausted, failed_precondition
from nanodist.services.common.leases import Lease, LeaseTable
from nanodist.v1 import lock_pb2 as pb

log = logging.getLogger("nanodist.lock")
TOKEN_BLOCK = 1_000_000
MAX_LOCKS = 100_000  # lock names
MAX_PER_OWNER = 1_000  # locks one owner holds or waits for


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


@dataclass
class Holding:
    """A granted lock: its lease, and what the lease was granted for."""

    lease: Lease
    lock: str
    owner: str
    mode: int
    token: int


@dataclass
class Request:
    owner: str
    mode: int
    ttl_ms: int
    granted: asyncio.Future[Holding]


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
    def __init__(self, tokens: FencingTokens) -> None:
        self.locks: dict[str, NamedLock] = {}
        self.leases = LeaseTable()
        self.holdings: dict[str, Holding] = {}  # lease id -> grant, for the lapse callback
        self.tokens = tokens
        self.per_owner: Counter[str] = Counter()  # grants held plus requests queued

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

    def _grant(self, lock: NamedLock, owner: str, mode: int, ttl_ms: int) -> Holding:
        self.per_owner[owner] += 1
        token = self.tokens.next()
        lock.last_token = token
        lease = self.leases.grant(ttl_ms, self._lapsed)
        holding = Holding(lease, lock.name, owner, mode, token)
        lock.holders[lease.lease_id] = self.holdings[lease.lease_id] = holding
        return holding

    def try_acquire(self, name: str, owner: str, mode: int, ttl_ms: int) -> Holding | None:
        """Grant at once if nobody queues ahead and the holders are compatible (FIFO fairness)."""
        self._check_owner(owner)
        lock = self.lock(name)
        if lock.queue or not lock.compatible(mode):
            return None
        return self._grant(lock, owner, mode, ttl_ms)

    def enqueue(self, name: str, owner: str, mode: int, ttl_ms: int) -> Request:
        self._check_owner(owner)
        request = Request(owner, mode, ttl_ms, asyncio.get_running_loop().create_future())
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
            raise failed_precondition(f"lease {lease_id!r} does not hold lock {name!r}")
        holding = lock.holders.pop(lease_id)
        self.holdings.pop(lease_id, None)
        self._forget(holding.owner)
        self.leases.revoke(lease_id)
        self._advance(lock)

    def _lapsed(self, lease: Lease) -> None:
        holding = self.holdings.pop(lease.lease_id, None)
        if holding is None:
            return
        lock = self.locks[holding.lock]
        if lock.holders.pop(lease.lease_id, None) is not None:
            self._forget(holding.owner)
            log.warning("lease of %s on lock %s lapsed", holding.owner, lock.name)
            self._advance(lock)

    def _advance(self, lock: NamedLock) -> None:
        """Grant queued requests in order while they are compatible with the holders."""
        while lock.queue and lock.compatible(lock.queue[0].mode):
            request = lock.queue.popleft()
            self._forget(request.owner)
            if request.granted.done():  # the waiter already gave up
                continue
            request.granted.set_result(self._grant(lock, request.owner, request.mode, request.ttl_ms))
