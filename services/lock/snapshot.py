"""Snapshot files of the lock service's state: log records (records.py) ending in an END record.

`snapshot-<LSN>.bin` holds the state that the log records before LSN built,
framed as the log frames its records. It is written under a temporary name,
fsynced, renamed into place and the directory fsynced, so a snapshot that
exists is whole; the END record, which counts the records before it, tells a
damaged one (a flipped bit, a cut file) from a whole one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from nanodist.services.common.durable import fsync_dir
from nanodist.services.common.wal import frame, frames
from nanodist.services.lock import records

PREFIX, SUFFIX = "snapshot-", ".bin"


class DamagedSnapshot(Exception):
    """A snapshot whose records fail their checksums or stop before their END record."""


def path(directory: str, lsn: int) -> str:
    return os.path.join(directory, f"{PREFIX}{lsn:016d}{SUFFIX}")


def lsns(directory: str) -> list[int]:
    """The LSNs of the snapshots in `directory`, oldest first."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    found = (n[len(PREFIX) : -len(SUFFIX)] for n in names if n.startswith(PREFIX) and n.endswith(SUFFIX))
    return sorted(int(lsn) for lsn in found if lsn.isdigit())


def discard_partial(directory: str) -> None:
    """Delete temporary files of snapshots that a crash interrupted."""
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith(PREFIX) and name.endswith(SUFFIX + ".tmp"):
            os.remove(os.path.join(directory, name))


def write(directory: str, lsn: int, taken: Iterable[tuple[int, bytes]]) -> str:
    """Write a snapshot covering the log before `lsn`; returns its path once it is durable."""
    final = path(directory, lsn)
    temporary = final + ".tmp"
    count = 0
    with open(temporary, "wb") as f:
        for kind, payload in taken:
            for part in frame(kind, payload):
                f.write(part)
            count += 1
        for part in frame(records.END, str(count).encode()):
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, final)
    fsync_dir(directory)
    return final


def read(directory: str, lsn: int) -> list[tuple[int, bytes]]:
    """The records of a snapshot, whole; DamagedSnapshot if any is missing or corrupt."""
    name = path(directory, lsn)
    with open(name, "rb") as f:
        data = f.read()
    found: list[tuple[int, bytes]] = []
    for kind, payload, end in frames(data, records.IN_SNAPSHOTS):
        if kind == records.END:
            if payload.isdigit() and int(payload) == len(found) and end == len(data):
                return found
            break
        found.append((kind, payload))
    raise DamagedSnapshot(f"{name} is damaged: {len(found)} intact records, then no matching END record")


def prune(directory: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` snapshots; returns the LSNs of those kept, oldest first."""
    found = lsns(directory)
    for lsn in found[:-keep]:
        os.remove(path(directory, lsn))
    return found[-keep:]
