"""A write-ahead log: records appended on the event loop, acknowledged once fsynced (group commit).

A service changes its state on the event loop, appends a record of the change
here, and answers only once the flusher has written and fsynced it. Changes
that arrive during an fsync wait for the next one together, so one fsync
covers many answers.

Records are numbered by a log sequence number (LSN). A segment file
`wal-<first LSN>.log` holds consecutive records, each
`kind (u8) | payload length (u64) | CRC-32 of payload (u32) | payload`, little
endian. What a kind means, and how its payload is encoded, belongs to the
service that writes it. A snapshot of the state records the LSN it covers and
starts a new segment; a restart replays the records at or past it. A torn or
corrupt record ends its segment: it can only be an unacknowledged write, and
the segment is truncated there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import NoReturn

from nanodist.services.common.durable import fsync_dir, write_all

log = logging.getLogger("nanodist.wal")
HEADER = struct.Struct("<BQI")


@dataclass
class Record:
    lsn: int
    kind: int
    payload: bytes


def frame(kind: int, payload: bytes | memoryview) -> list[bytes | memoryview]:
    """One record as written: its header, then its payload."""
    return [HEADER.pack(kind, len(payload), zlib.crc32(payload)), payload]


def frames(data: bytes, kinds: Container[int]) -> Iterator[tuple[int, bytes, int]]:
    """(kind, payload, offset just past it) of each intact record from the start of `data`.

    Stops at the first record that is torn, fails its CRC or has a kind not in `kinds`.
    """
    offset = 0
    while offset + HEADER.size <= len(data):
        kind, length, crc = HEADER.unpack_from(data, offset)
        body = data[offset + HEADER.size : offset + HEADER.size + length]
        if kind not in kinds or len(body) != length or zlib.crc32(body) != crc:
            return
        offset += HEADER.size + length
        yield kind, body, offset


def _segment_name(lsn: int) -> str:
    return f"wal-{lsn:016d}.log"


def segments(directory: str) -> list[int]:
    """First LSNs of the segments in `directory`, oldest first."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n[4:-4]) for n in names if n.startswith("wal-") and n.endswith(".log") and n[4:-4].isdigit())


def read(directory: str, from_lsn: int, kinds: Container[int]) -> Iterator[Record]:
    """Records with lsn >= from_lsn, in order; truncates a torn tail it meets."""
    starts = segments(directory)
    for index, start in enumerate(starts):
        following = starts[index + 1] if index + 1 < len(starts) else None
        if following is not None and following <= from_lsn:
            continue  # wholly covered by the snapshot
        path = os.path.join(directory, _segment_name(start))
        with open(path, "rb") as f:
            data = f.read()
        lsn, offset = start, 0
        for kind, body, end in frames(data, kinds):
            if lsn >= from_lsn:
                yield Record(lsn, kind, body)
            lsn, offset = lsn + 1, end
        if offset < len(data):
            log.warning("%s: torn record at byte %d (an unacknowledged write); truncating", path, offset)
            with open(path, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
        if following is not None and lsn != following:
            log.error("%s ends at LSN %d but the next segment starts at %d", path, lsn, following)


class WriteAheadLog:
    """Appends records and makes them durable in batches; `await append(...)` returns once fsynced.

    Records are written into the page cache on the event loop, in apply order,
    while a thread fsyncs what was written before it started: one fsync
    acknowledges every change that arrived during the previous one. A failed
    write or fsync stops the process (exit 70) rather than acknowledge what
    the disk may not hold; the restart replays the log.
    """

    def __init__(self, directory: str, next_lsn: int) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.next_lsn = next_lsn
        self._file = self._open(next_lsn)
        self._retired: list[int] = []  # earlier segments: fsynced and closed by the next flush
        self._waiting: list[asyncio.Future[None]] = []
        self._last: asyncio.Future[None] | None = None  # the newest record's durability
        self._wakeup = asyncio.Event()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
        self.fsyncs = 0
        self.records = 0  # appended since start
        self.segment_bytes = 0  # written since the last rotation

    def _open(self, lsn: int) -> int:
        path = os.path.join(self.directory, _segment_name(lsn))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fsync_dir(self.directory)
        return fd

    def append(self, kind: int, payload: bytes | memoryview) -> asyncio.Future[None]:
        """Write a record now (so LSN order is apply order); the future completes once it is durable."""
        try:
            write_all(self._file, frame(kind, payload))
        except OSError as error:
            _stop(f"write-ahead log write failed: {error}")
        self.next_lsn += 1
        self.records += 1
        self.segment_bytes += HEADER.size + len(payload)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        self._last = done
        self._wakeup.set()
        return done

    def synced(self) -> asyncio.Future[None]:
        """Completes once every record appended so far is durable (batches are flushed in order)."""
        if self._last is None or self._last.done():
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return asyncio.shield(self._last)

    def rotate(self) -> int:
        """Start a new segment at the next LSN and return that LSN (what a snapshot taken now covers)."""
        self._retired.append(self._file)
        self._file = self._open(self.next_lsn)
        self.segment_bytes = 0
        return self.next_lsn

    def prune(self, keep_from_lsn: int) -> None:
        """Delete segments that only hold records before `keep_from_lsn`."""
        for start in segments(self.directory):
            if start < keep_from_lsn:
                os.remove(os.path.join(self.directory, _segment_name(start)))

    async def _flush_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            waiting, self._waiting = self._waiting, []
            retired, self._retired = self._retired, []
            try:
                await asyncio.to_thread(self._sync, retired, self._file)
            except OSError as error:
                _stop(f"write-ahead log fsync failed: {error}")
            for future in waiting:
                if not future.done():
                    future.set_result(None)

    def _sync(self, retired: list[int], current: int) -> None:
        for fd in retired:
            os.fsync(fd)
            os.close(fd)
        os.fsync(current)
        self.fsyncs += 1

    async def close(self) -> None:
        await self.synced()  # records queued or in the flush under way
        self._flusher.cancel()
        for fd in [*self._retired, self._file]:
            os.fsync(fd)
            os.close(fd)


def _stop(reason: str) -> NoReturn:
    # After a failed fsync the kernel may have dropped the dirty pages, so retrying cannot make
    # them durable; the only safe answer is to restart from the log (as PostgreSQL does).
    log.critical("%s; stopping so that nothing unlogged is acknowledged", reason)
    logging.shutdown()
    os._exit(70)
