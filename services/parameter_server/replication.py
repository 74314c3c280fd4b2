"""A replicated shard's primary side: every change it applies goes to its backups in apply order, and
a change is acknowledged to its client only once every in-sync backup acknowledged it.

A backup opens Follow and gets a snapshot (a checkpoint, sent file by file) taken at the same loop
instant it was registered, then every later change. Once it is close behind, acknowledgements start
to wait for it; once it has every change made before that, it is published in sync. The primary
stops waiting for a backup only after the set without it is published. So the published set never
names a backup that misses an acknowledged change, and only a member of that set may take over
(replica_set.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from nanodist.services.common.errors import ServiceError
from nanodist.services.parameter_server import checkpoint
from nanodist.services.parameter_server.store import Store
from nanodist.v1 import parameter_server_pb2 as ps

FILE_PIECE_BYTES = 1 << 20
CATCH_UP_WINDOW = 256  # changes a follower may be behind when acknowledgements start to wait for it
log = logging.getLogger("nanodist.ps.replication")


@dataclass(eq=False)
class Follower:
    address: str
    incarnation: str
    records: asyncio.Queue[ps.FollowRecord | None] = field(default_factory=asyncio.Queue)  # None: stop
    acked: int = 0
    waited: bool = False  # acknowledgements wait for it
    waited_from: int = 0  # the sequence number at which they began to
    in_sync: bool = False  # named in the published in-sync set
    gone: bool = False


class Replicator:
    """The primary's followers, the sequence of its changes, and the wait for their acknowledgements.

    `publish(in_sync)` writes the in-sync set to the coordination store (a compare-and-swap that fails
    once this primary was deposed); `check_primary()` raises UNAVAILABLE once it may no longer serve.
    """

    def __init__(
        self,
        store: Callable[[], Store],
        publish: Callable[[list[str]], Awaitable[None]],
        check_primary: Callable[[], None],
        lag_limit: float,
    ) -> None:
        self.store = store
        self.publish = publish
        self.check_primary = check_primary
        self.lag_limit = lag_limit  # seconds a backup may hold up an acknowledgement before it is dropped
        self.epoch = 0
        self.seq = 0
        self.followers: dict[str, Follower] = {}
        self._changed = asyncio.Event()
        self._publishing = asyncio.Lock()
        self._dropping: set[asyncio.Task[None]] = set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def record(self, init: bytes = b"", push: bytes = b"") -> int:
        """Queue an applied change for every follower; its sequence number. Call it in the same loop
        step as the change itself, so that the sequence is the apply order."""
        self.seq += 1
        change = ps.FollowRecord(epoch=self.epoch, seq=self.seq, init=init) if init else None
        change = change or ps.FollowRecord(epoch=self.epoch, seq=self.seq, push=push)
        for follower in self.followers.values():
            follower.records.put_nowait(change)
        return self.seq

    async def acknowledged(self, seq: int) -> None:
        """Until every follower waited for acknowledged `seq`; one gone, or behind for lag_limit seconds,
        is first dropped from the published in-sync set."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lag_limit
        while True:
            self.check_primary()
            behind = [f for f in self.followers.values() if f.waited and f.acked < seq]
            if not behind:
                return
            lost = [f for f in behind if f.gone or loop.time() >= deadline]
            if lost:
                await self._drop(lost)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())

    async def _publish_in_sync(self) -> None:
        async with self._publishing:
            await self.publish([f.incarnation for f in self.followers.values() if f.in_sync])

    async def _drop(self, lost: list[Follower]) -> None:
        for follower in lost:
            if follower.in_sync or not follower.gone:
                reason = "gone" if follower.gone else "behind"
                log.warning("backup %s leaves the in-sync set (%s)", follower.address, reason)
            follower.in_sync = False
            follower.gone = True
            follower.records.put_nowait(None)
        # Published first: until then the published set may still name them, so they are still waited for.
        await self._publish_in_sync()
        for follower in lost:
            follower.waited = False
            if self.followers.get(follower.incarnation) is follower:
                del self.followers[follower.incarnation]
        self._notify()

    async def _catch_up(self, follower: Follower) -> None:
        """Once a follower is close behind, acknowledgements wait for it; once it has every change made
        before they began to, it is published in sync: it then holds every acknowledged change."""
        if not follower.waited and self.seq - follower.acked <= CATCH_UP_WINDOW:
            follower.waited, follower.waited_from = True, self.seq
        if follower.waited and not follower.in_sync and follower.acked >= follower.waited_from:
            follower.in_sync = True
            await self._publish_in_sync()
            log.info("backup %s is in sync at change %d (epoch %d)", follower.address, follower.acked, self.epoch)

    async def _read_acks(self, requests: AsyncIterator[ps.FollowRequest], follower: Follower) -> None:
        try:
            async for request in requests:
                if not isinstance(request, ps.FollowRequest):
                    return  # malformed: this follower starts again from a snapshot
                follower.acked = max(follower.acked, request.acked_seq)
                self._notify()
                if not follower.gone:
                    await self._catch_up(follower)
        finally:
            follower.gone = True
            self._notify()

    async def follow(
        self, requests: AsyncIterator[ps.FollowRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ps.FollowRecord]:
        """A backup's stream: a snapshot, then every change, until it or this primary goes."""
        self.check_primary()
        first = await anext(aiter(requests), None)
        if not isinstance(first, ps.FollowRequest) or not first.incarnation:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "Follow: the first message names the backup")
        earlier = self.followers.pop(first.incarnation, None)
        if earlier is not None:  # the same process following again: its old stream ends
            earlier.gone = True
            earlier.records.put_nowait(None)
        follower = Follower(first.address, first.incarnation)
        self.followers[first.incarnation] = follower
        snap, at = checkpoint.snapshot(self.store()), self.seq  # the same instant as the registration
        follower.acked = 0
        acks = asyncio.create_task(self._read_acks(requests, follower))
        directory = tempfile.mkdtemp(prefix="nanodist-follow-")
        try:
            path = await asyncio.to_thread(checkpoint.write, directory, snap)
            for name in sorted(os.listdir(path)):
                for piece in await asyncio.to_thread(_pieces, os.path.join(path, name)):
                    yield ps.FollowRecord(epoch=self.epoch, snapshot_file=ps.SnapshotFile(name=name, data=piece))
            shutil.rmtree(directory, ignore_errors=True)
            log.info("backup %s: snapshot at change %d sent", follower.address, at)
            yield ps.FollowRecord(epoch=self.epoch, seq=at, snapshot_done=True)
            while (change := await follower.records.get()) is not None:
                yield change
        finally:
            acks.cancel()
            follower.gone = True
            shutil.rmtree(directory, ignore_errors=True)
            if follower.waited:  # out of the published set now, not at the next push
                task = asyncio.get_running_loop().create_task(self._drop([follower]))
                self._dropping.add(task)
                task.add_done_callback(self._dropping.discard)
            elif self.followers.get(follower.incarnation) is follower:
                del self.followers[follower.incarnation]
            self._notify()

    def status(self) -> list[ps.FollowerStatus]:
        return [
            ps.FollowerStatus(address=f.address, in_sync=f.in_sync, behind=max(0, self.seq - f.acked))
            for f in self.followers.values()
        ]


def _pieces(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return list(iter(lambda: f.read(FILE_PIECE_BYTES), b"")) or [b""]
