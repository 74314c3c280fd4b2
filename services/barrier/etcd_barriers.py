"""The barrier service's state on etcd: barriers, their generations and the members' sessions.

Layout under the store's prefix:
- barrier/<name>#: one JSON record per barrier (parties, generation, arrivals, known members, how
  it broke, and how each recent generation ended). Every change reads it and writes it back in a
  transaction that fails if another replica changed it in between, and then reads again.
- barrier-session/<lease>: a member's session, attached to an etcd lease of the session's TTL.
- barrier-open/<idempotency key>: the session an OpenSession opened, under the same lease.

A waiter watches its barrier's record and reads it again on every change; its generation ended
when the record says so. Every replica watches the sessions: a session key deleted without having
been closed is a lapse, and the replica breaks each barrier that knows the member (several replicas
may try; the first write wins, the rest find it broken).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import grpc

from nanodist.etcd import kv_pb2, rpc_pb2
from nanodist.services.barrier.server import lapse_reason
from nanodist.services.barrier.state import Barrier, BarrierBroken, remember_released
from nanodist.services.common.errors import ServiceError, failed_precondition, invalid, not_found
from nanodist.services.common.etcd import Etcd, LeaseLapsed, absent, put_op

T = TypeVar("T")
KEEP_ENDED = 64  # generations whose outcome a record keeps, for waiters that read it late
KEEP_RELEASED_IDS = 4096  # request ids of released arrivals a record keeps (it must fit one etcd request)
log = logging.getLogger("nanodist.barrier")


@dataclass
class Record:
    name: str
    parties: int = 0
    generation: int = 0
    arrived: dict[str, int] = field(default_factory=dict)  # member -> arrival index
    known: list[str] = field(default_factory=list)
    broken: list | None = None  # [message, missing members] while the current generation is broken
    lapsed_member: str = ""
    ended: dict[str, list | None] = field(default_factory=dict)  # generation -> None (released) or [message, missing]
    arrival_ids: dict[str, int] = field(default_factory=dict)  # request id -> arrival index, this generation
    released_ids: dict[str, list[int]] = field(default_factory=dict)  # request id -> [generation, index]

    def missing(self) -> list[str]:
        return sorted(set(self.known) - set(self.arrived))

    def know(self, member: str) -> None:
        if member not in self.known:
            self.known.append(member)

    def _end(self, outcome: list | None) -> None:
        self.ended[str(self.generation)] = outcome
        for old in sorted(self.ended, key=int)[:-KEEP_ENDED]:
            del self.ended[old]
        self.generation += 1
        self.arrived, self.arrival_ids = {}, {}

    def arrive(self, member: str, parties: int, request_id: str = "") -> tuple[int, int, bool]:
        """(arrival index, generation, whether it is released: by this arrival, or before a retry)."""
        if request_id in self.released_ids:
            generation, index = self.released_ids[request_id]
            return index, generation, True
        if self.broken is not None:
            raise BarrierBroken(
                grpc.StatusCode.ABORTED,
                f"barrier {self.name!r} is broken ({self.broken[0]}); call Reset to start a fresh generation",
                self.broken[1],
            )
        if self.arrived and parties != self.parties:
            raise failed_precondition(
                f"parties: {parties} differs from {self.parties} of generation "
                f"{self.generation} of barrier {self.name!r}, in progress"
            )
        self.parties = parties
        self.know(member)
        index = self.arrived.setdefault(member, len(self.arrived))
        if request_id:
            self.arrival_ids[request_id] = index
        generation = self.generation
        if len(self.arrived) >= parties:
            remember_released(self.released_ids, self.arrival_ids, generation, keep=KEEP_RELEASED_IDS)
            self._end(None)
            return index, generation, True
        return index, generation, False

    def break_(self, reason: str, lapsed_member: str = "") -> bool:
        if self.broken is not None:
            return False
        described = Barrier(self.name, self.parties, self.generation, self.arrived, set(self.known))
        message = f"barrier {self.name!r} generation {self.generation} broke: {reason}; {described.describe_missing()}"
        self.broken, self.lapsed_member = [message, self.missing()], lapsed_member
        return True

    def reset(self) -> int:
        self._end([f"barrier {self.name!r} was reset", self.missing()])
        self.broken, self.lapsed_member = None, ""
        return self.generation

    def outcome(self, generation: int) -> BarrierBroken | bool:
        """True once `generation` was released, its error once it broke or was reset, False while open."""
        if str(generation) in self.ended:
            ended = self.ended[str(generation)]
            return True if ended is None else BarrierBroken(grpc.StatusCode.ABORTED, ended[0], ended[1])
        if generation == self.generation and self.broken is not None:
            return BarrierBroken(grpc.StatusCode.ABORTED, self.broken[0], self.broken[1])
        return generation < self.generation  # ended so long ago that its outcome was dropped: released


class EtcdBarriers:
    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        prefix = etcd.address.prefix
        self._barriers, self._sessions, self._opened = (
            prefix + b"barrier/",
            prefix + b"barrier-session/",
            prefix + b"barrier-open/",
        )
        self._batches: dict[str, _Batch] = {}  # changes waiting to be written, per barrier
        self._followers: dict[str, _Follower] = {}  # barriers with waiters on this replica

    def _key(self, name: str) -> bytes:
        return self._barriers + name.encode() + b"#"

    @staticmethod
    def _record(kv: kv_pb2.KeyValue) -> Record:
        return Record(**json.loads(kv.value))

    async def read(self, name: str) -> tuple[Record, int]:
        """The barrier's record and the revision it was read at; NOT_FOUND if it does not exist."""
        kvs, revision = await self.etcd.range(self._key(name))
        if not kvs:
            raise not_found(f"name: no barrier {name!r}")
        return self._record(kvs[0]), revision

    async def all(self) -> list[Record]:
        kvs, _ = await self.etcd.range(self._barriers)
        return [self._record(kv) for kv in kvs]

    async def change(self, name: str, edit: Callable[[Record], T], *, create: bool) -> tuple[T, Record]:
        """Apply `edit` to the barrier's record in a transaction. Changes asked for while one is being
        written go together in the next (a thousand arrivals are a few writes, not a thousand that
        fail each other's comparisons); a conflict with another replica reads and applies them again."""
        batch = self._batches.setdefault(name, _Batch())
        future: asyncio.Future[tuple[T, Record]] = asyncio.get_running_loop().create_future()
        batch.pending.append((edit, create, future))
        if batch.writer is None or batch.writer.done():
            batch.writer = asyncio.create_task(self._write(name, batch))
        return await future

    async def _write(self, name: str, batch: _Batch) -> None:
        while batch.pending:
            edits, batch.pending = batch.pending, []
            try:
                outcomes, record = await self._apply(name, [(edit, create) for edit, create, _ in edits])
            except Exception as error:  # noqa: BLE001 - etcd unreachable: every caller of the batch hears it
                outcomes, record = [error] * len(edits), None
            for (_, _, future), outcome in zip(edits, outcomes, strict=True):
                if future.done():
                    continue  # its caller went away
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result((outcome, record))
        if not batch.pending:
            self._batches.pop(name, None)

    async def _apply(self, name: str, edits: list[tuple[Callable[[Record], Any], bool]]) -> tuple[list[Any], Record]:
        key = self._key(name)
        while True:
            found = await self.etcd.get(key)
            record = self._record(found) if found is not None else None
            outcomes: list[Any] = []
            for edit, create in edits:
                if record is None and not create:
                    outcomes.append(not_found(f"name: no barrier {name!r}"))
                    continue
                record = record if record is not None else Record(name)
                try:
                    outcomes.append(edit(record))
                except ServiceError as refused:  # refused before it changed anything
                    outcomes.append(refused)
            if record is None or all(isinstance(o, ServiceError) for o in outcomes):
                return outcomes, record if record is not None else Record(name)
            unchanged = (
                rpc_pb2.Compare(
                    key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=found.mod_revision
                )
                if found is not None
                else absent(key)
            )
            txn = rpc_pb2.TxnRequest(compare=[unchanged], success=[put_op(key, json.dumps(asdict(record)).encode())])
            if (await self.etcd.txn(txn)).succeeded:
                return outcomes, record

    async def settled(self, name: str, generation: int, timeout: float) -> BarrierBroken | bool:
        """Wait up to timeout seconds for `generation` to end: True (released), its error, or False."""
        follower = self._followers.get(name)
        if follower is None:
            follower = self._followers[name] = _Follower(self, name)
        follower.waiters += 1
        try:
            return await follower.settled(generation, timeout)
        finally:
            follower.waiters -= 1
            if not follower.waiters:
                follower.task.cancel()
                del self._followers[name]

    # --- sessions ---------------------------------------------------------------------------------

    def _session_key(self, session_id: str) -> bytes:
        return self._sessions + session_id.encode()

    async def open_session(self, member: str, ttl_ms: int, barriers: list[str], key: str) -> tuple[str, int]:
        for name in barriers:  # its loss breaks them even before it first waits
            await self.change(name, lambda record: record.know(member), create=True)
        if key:
            opened = await self.etcd.get(self._opened + key.encode())
            if opened is not None:
                session = await self.etcd.get(self._session_key(opened.value.decode()))
                if session is not None:
                    if json.loads(session.value)["member"] != member:
                        raise invalid(f"idempotency_key: {key!r} already opened a session for another member")
                    ttl_s = await self.etcd.keep_alive(session.lease)
                    if ttl_s > 0:
                        return opened.value.decode(), ttl_s * 1000
        lease, ttl_s = await self.etcd.grant(max(1, -(-ttl_ms // 1000)))
        session_id = f"{lease:016x}"
        value = json.dumps({"member": member, "ttl_ms": ttl_s * 1000, "closed": False}).encode()
        txn = rpc_pb2.TxnRequest(success=[put_op(self._session_key(session_id), value, lease)])
        if key:
            txn.compare.append(absent(self._opened + key.encode()))
            txn.success.append(put_op(self._opened + key.encode(), session_id.encode(), lease))
        try:
            written = (await self.etcd.txn(txn)).succeeded
        except LeaseLapsed:  # this replica stalled past the TTL between the grant and the write: try anew
            return await self.open_session(member, ttl_ms, barriers, key)
        if not written:  # the same key raced in through another replica
            await self.etcd.revoke(lease)
            return await self.open_session(member, ttl_ms, barriers, key)
        return session_id, ttl_s * 1000

    async def session(self, session_id: str) -> kv_pb2.KeyValue | None:
        return await self.etcd.get(self._session_key(session_id)) if _lease_of(session_id) else None

    async def keep_alive(self, session_id: str) -> int:
        lease = _lease_of(session_id)
        ttl_s = await self.etcd.keep_alive(lease) if lease else 0
        if ttl_s <= 0:
            raise not_found(f"session_id: session {session_id!r} has lapsed or never existed")
        return ttl_s * 1000

    async def close_session(self, session_id: str) -> None:
        """End a session without breaking anything: marked closed first, so the watchers let it go."""
        session = await self.session(session_id)
        if session is None:
            return
        value = json.loads(session.value) | {"closed": True}
        key = self._session_key(session_id)
        same = rpc_pb2.Compare(
            key=key, target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL, mod_revision=session.mod_revision
        )
        with contextlib.suppress(LeaseLapsed):  # it lapsed meanwhile: nothing is left to close
            await self.etcd.txn(
                rpc_pb2.TxnRequest(compare=[same], success=[put_op(key, json.dumps(value).encode(), session.lease)])
            )
            await self.etcd.revoke(session.lease)

    async def watch_lapses(self) -> None:
        """Forever: break the barriers of every member whose session lapses."""
        revision = await self.etcd.revision()
        while True:
            async with self.etcd.watch(self._sessions, revision + 1, prefix=True, prev_kv=True) as events:
                while (event := await events.get()) is not None:
                    revision = max(revision, event.kv.mod_revision)
                    if event.type == kv_pb2.Event.DELETE and event.prev_kv.value:
                        session = json.loads(event.prev_kv.value)
                        if not session["closed"]:
                            await self._lapsed(session["member"], session["ttl_ms"])
            await asyncio.sleep(0.5)  # the watch broke (a member lost): watch again on another

    async def _lapsed(self, member: str, ttl_ms: int) -> None:
        for record in await self.all():
            if member in record.known and record.broken is None:
                broke, _ = await self.change(
                    record.name, lambda r: r.break_(lapse_reason(member, ttl_ms), member), create=False
                )
                if broke:
                    log.warning("barrier %s broken: session of %s lapsed", record.name, member)


@dataclass
class _Batch:
    pending: list[tuple[Callable[[Record], Any], bool, asyncio.Future[Any]]] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None


class _Follower:
    """One barrier's record as this replica's waiters see it: a single watch for all of them, and a
    read after each change (the event is a hint; the record read is what waiters decide on)."""

    def __init__(self, barriers: EtcdBarriers, name: str) -> None:
        self.barriers, self.name = barriers, name
        self.record: Record | None = None
        self.changed = asyncio.Event()
        self.waiters = 0
        self.task = asyncio.create_task(self._follow())

    def _publish(self, record: Record) -> None:
        self.record = record
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def _follow(self) -> None:
        while True:
            record, revision = await self.barriers.read(self.name)
            self._publish(record)
            async with self.barriers.etcd.watch(self.barriers._key(self.name), revision + 1) as events:
                while await events.get() is not None:
                    while not events.empty():  # changes that came together: one read for all
                        events.get_nowait()
                    record, _ = await self.barriers.read(self.name)
                    self._publish(record)
            await asyncio.sleep(0.5)  # the watch broke (an etcd member lost): read and watch again

    async def settled(self, generation: int, timeout: float) -> BarrierBroken | bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            changed, record = self.changed, self.record
            outcome = record.outcome(generation) if record is not None else False
            remaining = deadline - loop.time()
            if outcome is not False or remaining <= 0:
                return outcome
            if self.task.done() and self.task.exception() is not None:
                raise self.task.exception()  # type: ignore[misc]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)


def _lease_of(session_id: str) -> int:
    try:
        return int(session_id, 16) if len(session_id) == 16 else 0
    except ValueError:
        return 0


async def run_watcher(barriers: EtcdBarriers) -> None:
    """watch_lapses, started again after an error (etcd unreachable for a while)."""
    while True:
        try:
            await barriers.watch_lapses()
        except ServiceError as error:
            log.warning("watching the barrier sessions failed (%s); starting again", error)
            await asyncio.sleep(1.0)
