"""The parameter server's write-ahead-log records: every applied Init and Push, as the request's own protobuf bytes.

The log itself (segments, group commit, torn tails) is nanodist.services.common.wal;
this module names the parameter server's record kinds. Keeping the payload the
request's wire bytes makes the log as readable from another language as the wire is.
"""

from __future__ import annotations

from collections.abc import Iterator

from nanodist.services.common import wal as _log
from nanodist.services.common.wal import HEADER, Record, WriteAheadLog, segments

__all__ = ["HEADER", "INIT", "PUSH", "Record", "WriteAheadLog", "read", "segments"]

INIT, PUSH = 1, 2


def read(directory: str, from_lsn: int) -> Iterator[Record]:
    """Records with lsn >= from_lsn, in order; truncates a torn tail it meets."""
    return _log.read(directory, from_lsn, (INIT, PUSH))
