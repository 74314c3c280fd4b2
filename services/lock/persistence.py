"""How the lock service keeps its state in --state-dir: a write-ahead log of every change, bounded by snapshots.

Every change to the key-value store and to the held locks (records.py) is
appended to `<state-dir>/wal/` as it is made, and every answer waits until the
log is fsynced past everything the answer reflects, so a kill -9 loses nothing
that was acknowledged. Once the log has grown by `max_log_bytes`, and on
SIGTERM, a snapshot of the whole state starts a new log segment; the last two
snapshots are kept, with the log from the older one on, so a damaged newest
snapshot still has one to fall back on.

At start the newest intact snapshot is loaded and the log past it replayed.
Held locks come back with their leases, each given its whole TTL from the
restart; requests that were waiting for a lock do not (their callers retry).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Coroutine

from nanodist.services.common import wal
from nanodist.services.common.errors import ConfigurationError, ServiceError
from nanodist.services.lock import records, snapshot
from nanodist.services.lock.kv import KeyValueStore
from nanodist.services.lock.locks import LockTable

log = logging.getLogger("nanodist.lock.persistence")
DEFAULT_MAX_LOG_BYTES = 64 << 20
KEPT_SNAPSHOTS = 2


class Persistence:
    """Restores the store and the lock table from `directory`, then logs their every change."""

    def __init__(
        self, directory: str, store: KeyValueStore, table: LockTable, max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    ) -> None:
        if max_log_bytes < 1:
            raise ConfigurationError(f"--max-log-bytes must be >= 1, got {max_log_bytes}")
        self.directory = directory
        self.store = store
        self.table = table
        self.max_log_bytes = max_log_bytes  # a snapshot lets the log start over, so disk use stays bounded
        self.log: wal.WriteAheadLog | None = None
        self._snapshotting = asyncio.Lock()
        self._snapshot_due = False
        self._tasks: set[asyncio.Task[None]] = set()  # referenced, so that the loop cannot drop them

    @property
    def wal_directory(self) -> str:
        return os.path.join(self.directory, "wal")

    def start(self) -> None:
        """Load the newest intact snapshot, replay the log past it, and log every change from now on."""
        snapshot.discard_partial(self.directory)
        from_lsn = self._load_snapshot()
        next_lsn = from_lsn
        for record in wal.read(self.wal_directory, from_lsn, records.LOGGED):
            self._apply(record.kind, record.payload, f"log record {record.lsn}")
            next_lsn = record.lsn + 1
        self.log = wal.WriteAheadLog(self.wal_directory, next_lsn)
        self.store.journal = self.table.journal = self._append
        log.info(
            "state restored from %s: %d keys, %d held locks (%d log records replayed)",
            self.directory,
            len(self.store.values),
            len(self.table.holdings),
            next_lsn - from_lsn,
        )

    def _load_snapshot(self) -> int:
        """Apply the newest intact snapshot; returns the LSN it covers (0 with none)."""
        found = snapshot.lsns(self.directory)
        for lsn in reversed(found):
            try:
                taken = snapshot.read(self.directory, lsn)
            except snapshot.DamagedSnapshot as error:
                log.error("%s; trying the one before it", error)
                continue
            for kind, payload in taken:
                self._apply(kind, payload, f"snapshot {lsn}")
            return lsn
        segments = wal.segments(self.wal_directory)
        if segments and segments[0] != 0:
            raise ConfigurationError(
                f"--state-dir {self.directory}: no intact snapshot, and the log before LSN {segments[0]} "
                "is gone; refusing to start from a partial state"
            )
        return 0

    def _apply(self, kind: int, payload: bytes, where: str) -> None:
        try:
            if kind in (records.GRANT, records.RELEASE, records.RELEASED):
                self.table.replay(kind, payload)
            elif kind == records.REMEMBERED:
                self.store.remember(*records.from_json(payload))
            else:
                self.store.replay(kind, payload)
        except ServiceError as error:  # accepted once, refused now: only a hand-edited log gets here
            log.error("%s is refused on replay (%s); skipped", where, error.message)

    def _append(self, kind: int, payload: bytes) -> None:
        assert self.log is not None
        self.log.append(kind, payload)  # answers wait for synced(), which covers this record
        if self.log.segment_bytes > self.max_log_bytes and not self._snapshot_due:
            self._snapshot_due = True  # one snapshot for it, however many changes arrive before it starts
            self._spawn(self.snapshot("log size"))

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def synced(self) -> None:
        """Wait until every change made so far is durable; every answer awaits this first."""
        if self.log is not None:
            await self.log.synced()

    async def snapshot(self, reason: str) -> None:
        assert self.log is not None
        async with self._snapshotting:
            lsn = self.log.rotate()
            self._snapshot_due = False
            # Taken on the loop, at the same instant as the rotation; written from copies in a thread.
            taken = itertools.chain(self.store.snapshot(), self.table.snapshot())
            path = await asyncio.to_thread(snapshot.write, self.directory, lsn, taken)
            kept = snapshot.prune(self.directory, KEPT_SNAPSHOTS)
            if len(kept) == KEPT_SNAPSHOTS:
                self.log.prune(kept[0])  # the log from the older snapshot on stays, as its fallback
            log.info("snapshot (%s): %s", reason, path)

    async def close(self) -> None:
        """On SIGTERM: a last snapshot if the log has grown since the previous one, then the log is closed."""
        if self.log is None:
            return
        if self.log.segment_bytes:
            await self.snapshot("shutdown")
        await self.log.close()
