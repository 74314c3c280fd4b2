"""How a parameter server keeps what it acknowledged: none, checkpoints, or a write-ahead log.

- none: state lives in memory only; a crash loses everything.
- checkpoint: snapshots every `interval` seconds, every `every_pushes` applied
  pushes, and on SIGTERM. A kill -9 loses the pushes since the last snapshot.
- wal: checkpoints plus a write-ahead log of every applied Init and Push,
  fsynced before the ack (group commit). A kill -9 loses no acknowledged push,
  and the request_id dedup window is rebuilt, so retries stay exactly-once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from enum import StrEnum

from nanodist.services.common.errors import ConfigurationError, ServiceError
from nanodist.services.parameter_server import checkpoint, init_entry, wal
from nanodist.services.parameter_server.store import Store
from nanodist.v1 import parameter_server_pb2 as ps
from nanodist.wire import codec

log = logging.getLogger("nanodist.ps.durability")


class Durability(StrEnum):
    NONE = "none"
    CHECKPOINT = "checkpoint"
    WAL = "wal"


def _change_marker(store: Store) -> tuple[int, int, int, int]:
    """Changes whenever the store does: a new key, an applied or accumulated push, a new fencing mark."""
    pending = sum(len(p.workers) for s in store.slots.values() for p in s.pending.values())
    return len(store.slots), sum(s.version for s in store.slots.values()), pending, store.fencing_high


class Persistence:
    """Restores a store at start, then checkpoints it and (in wal mode) logs every change."""

    def __init__(
        self,
        store: Store,
        mode: Durability,
        directory: str | None,
        interval: float = 300.0,
        every_pushes: int = 0,
        max_log_bytes: int = 1 << 30,
    ) -> None:
        if mode is not Durability.NONE and not directory:
            raise ConfigurationError(f"--durability {mode.value} needs --checkpoint-dir")
        if mode is Durability.NONE and directory:
            raise ConfigurationError(
                "--durability none keeps nothing on disk; drop --checkpoint-dir or choose checkpoint or wal"
            )
        self.store = store
        self.mode = mode
        self.directory = directory or ""
        self.interval = interval
        self.every_pushes = every_pushes
        self.max_log_bytes = max_log_bytes  # a checkpoint lets the log start over, so disk use stays bounded
        self.log: wal.WriteAheadLog | None = None
        self._saved = _change_marker(store)
        self._saving = asyncio.Lock()
        self._since_save = 0
        self._log_full = False
        self._tasks: set[asyncio.Task[None]] = set()  # referenced, so that the loop cannot drop them

    @property
    def wal_directory(self) -> str:
        return os.path.join(self.directory, "wal")

    async def start(self, apply_push: Callable[[codec.PushMessage], bytes]) -> None:
        """Restore the newest intact checkpoint, replay the log past it, and start checkpointing."""
        if self.mode is Durability.NONE:
            return
        restored = checkpoint.restore(self.directory, self.store)
        if self.mode is Durability.WAL:
            from_lsn = (restored[1] or 0) if restored else 0
            next_lsn = from_lsn
            for record in wal.read(self.wal_directory, from_lsn):
                try:
                    self._replay(record, apply_push)
                except ServiceError as error:  # accepted once, refused now: the flags must have changed
                    log.error("write-ahead-log record %d is refused on replay (%s); skipped", record.lsn, error)
                next_lsn = record.lsn + 1
            if next_lsn > from_lsn:
                log.info(
                    "replayed %d write-ahead-log records (LSN %d to %d)", next_lsn - from_lsn, from_lsn, next_lsn - 1
                )
            self.log = wal.WriteAheadLog(self.wal_directory, next_lsn)
        elif wal.segments(self.wal_directory):
            log.warning("%s holds a write-ahead log that --durability %s ignores", self.wal_directory, self.mode.value)
        self._saved = _change_marker(self.store)
        if self.interval > 0:
            self._spawn(self._periodically())

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _replay(self, record: wal.Record, apply_push: Callable[[codec.PushMessage], bytes]) -> None:
        if record.kind == wal.INIT:
            init_entry.apply_logged_init(self.store, record.payload)
        else:
            apply_push(codec.decode_push(record.payload))

    def log_init(self, request: ps.InitRequest) -> asyncio.Future[None] | None:
        return self.log.append(wal.INIT, request.SerializeToString()) if self.log else None

    def log_push(self, payload: bytes) -> asyncio.Future[None] | None:
        """Log an applied push; await the result before acknowledging it."""
        if self.mode is not Durability.NONE and self.every_pushes:
            self._since_save += 1
            if self._since_save >= self.every_pushes:
                self._since_save = 0
                self._spawn(self.save("push count"))
        if self.log is None:
            return None
        durable = self.log.append(wal.PUSH, payload)
        if self.log.segment_bytes > self.max_log_bytes and not self._log_full:
            self._log_full = True  # one checkpoint for it, however many pushes arrive before it starts
            self._spawn(self.save("log size"))
        return durable

    async def synced(self) -> None:
        """Wait until everything logged so far is durable (a replayed ack must not outrun its record)."""
        if self.log:
            await self.log.synced()

    async def save(self, reason: str) -> None:
        async with self._saving:
            if self.mode is Durability.NONE or _change_marker(self.store) == self._saved:
                return
            lsn = self.log.rotate() if self.log else None
            self._log_full = False
            snap = checkpoint.snapshot(self.store, lsn)  # on the loop: the same instant as the rotation
            marker = _change_marker(self.store)
            path = await asyncio.to_thread(checkpoint.write, self.directory, snap)
            self._saved = marker
            if self.log:
                # The log is kept from the oldest kept checkpoint, so that a damaged newest one falls back
                # to it; while there is only one, from the start, as it has no fallback of its own.
                covered = checkpoint.wal_lsns(self.directory)
                if len(covered) >= checkpoint.KEEP:
                    self.log.prune(min(covered))
            log.info("checkpoint (%s): %s", reason, path)

    async def _periodically(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.save("interval")

    async def close(self) -> None:
        """On SIGTERM: a final checkpoint, then the log is flushed and closed."""
        if self.store.slots:
            await self.save("shutdown")
        if self.log:
            await self.log.close()
