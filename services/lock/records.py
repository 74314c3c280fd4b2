"""What the lock service writes to its log and snapshots: one record kind per change.

Only changes that happened are logged, so a replay applies each record without
checking it again: a CompareAndSwap that did not swap, a Delete of an absent
key or a refused request leaves no record. Records that carry bytes are the
API request's own protobuf bytes; the others are small JSON objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

SET = 1  # SetRequest: the key now holds value
DELETE = 2  # DeleteRequest: the key is gone
SWAP = 3  # CompareAndSwapRequest of a call that swapped: the key now holds desired
ADD = 4  # AddRequest of an applied Add: replayed as the same addition
GRANT = 5  # JSON: a lock granted under a lease (see locks.Holding.record)
RELEASE = 6  # ReleaseRequest: a lease ended (released, lapsed or given up)
REMEMBERED = 7  # snapshots only, JSON [request_id, key, counter or null]: one entry of the dedup window
END = 8  # snapshots only, decimal text: the number of records before it, so a cut snapshot is seen
RELEASED = 9  # ReleaseRequest: its holder released the lease, so a retry of that Release is answered OK

LOGGED = (SET, DELETE, SWAP, ADD, GRANT, RELEASE, RELEASED)
IN_SNAPSHOTS = (SET, GRANT, REMEMBERED, RELEASED, END)

# Called with every change as it is made, on the event loop.
Journal = Callable[[int, bytes], None]


def unlogged(kind: int, payload: bytes) -> None:
    """The journal of a service without --state-dir: nothing is written."""


def to_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def from_json(payload: bytes) -> Any:
    return json.loads(payload)
