"""The key-value store with atomics that lives on the lock server."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterator

from nanodist.services.common.errors import ServiceError, exhausted, failed_precondition, invalid, not_found
from nanodist.services.lock import records
from nanodist.v1 import lock_pb2 as pb

MAX_REMEMBERED = 65536  # request ids of applied Adds and swaps kept for retries


class KeyValueStore:
    """Values by key, and the request ids of recent Adds and swaps so that a retry is applied once.

    Every change is handed to `journal` as it is made (see records.py); `replay`
    applies a logged change again after a restart.
    """

    def __init__(self, max_value_bytes: int, max_keys: int = 1_000_000) -> None:
        self.values: dict[str, bytes] = {}
        self.max_value_bytes = max_value_bytes
        self.max_keys = max_keys
        self.changed = asyncio.Event()  # replaced after each set, so waiters wake once per change
        # request id -> (key, the counter an Add returned, or None for a swap), oldest first
        self.remembered: OrderedDict[str, tuple[str, int | None]] = OrderedDict()
        self.journal: records.Journal = records.unlogged

    def check_value(self, value: bytes, field: str = "value") -> bytes:
        if len(value) > self.max_value_bytes:
            raise invalid(f"{field}: {len(value)} bytes, at most {self.max_value_bytes} allowed")
        return value

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _check_room(self, key: str) -> None:
        if key not in self.values and len(self.values) >= self.max_keys:
            raise exhausted(f"key: the store holds {len(self.values)} keys, its limit (--max-keys)")

    def _put(self, key: str, value: bytes) -> None:
        self.values[key] = value
        self._notify()

    def remember(self, request_id: str, key: str, counter: int | None) -> None:
        if request_id:
            self.remembered[request_id] = (key, counter)
            if len(self.remembered) > MAX_REMEMBERED:
                self.remembered.popitem(last=False)

    def _seen(self, request_id: str, key: str, adding: bool) -> tuple[str, int | None] | None:
        """What an earlier call with this request id did, if it is still remembered."""
        seen = self.remembered.get(request_id) if request_id else None
        if seen is None:
            return None
        if seen[0] != key or (seen[1] is not None) != adding:
            raise reused_request_id(request_id, seen[0], seen[1] is not None)
        return seen

    def get(self, key: str) -> bytes:
        value = self.values.get(key)
        if value is None:
            raise not_found(f"key: {key!r} does not exist")
        return value

    def set(self, key: str, value: bytes) -> None:
        self.check_value(value)
        self._check_room(key)
        self._put(key, value)
        self.journal(records.SET, pb.SetRequest(key=key, value=value).SerializeToString())

    def delete(self, key: str) -> bool:
        if self.values.pop(key, None) is None:
            return False
        self.journal(records.DELETE, pb.DeleteRequest(key=key).SerializeToString())
        return True

    def compare_and_swap(
        self, key: str, expected: bytes, expect_absent: bool, desired: bytes, request_id: str = ""
    ) -> tuple[bool, bytes | None]:
        self.check_value(desired, "desired")
        if self._seen(request_id, key, adding=False) is not None:
            return True, desired  # a retry of a call that swapped: answer as it was answered
        current = self.values.get(key)
        matches = current is None if expect_absent else current == expected
        if not matches:
            return False, current
        self._check_room(key)
        self._put(key, desired)
        self.remember(request_id, key, None)
        swap = pb.CompareAndSwapRequest(key=key, desired=desired, request_id=request_id)
        self.journal(records.SWAP, swap.SerializeToString())
        return True, desired

    def _sum(self, key: str, delta: int) -> int:
        return counter_sum(key, self.values.get(key, b"0"), delta)

    def add(self, key: str, delta: int, request_id: str = "") -> int:
        seen = self._seen(request_id, key, adding=True)
        if seen is not None and seen[1] is not None:
            return seen[1]  # a retry: the first call's value, and nothing added again
        value = self._sum(key, delta)
        self._check_room(key)
        self._put(key, str(value).encode())
        self.remember(request_id, key, value)
        self.journal(records.ADD, pb.AddRequest(key=key, delta=delta, request_id=request_id).SerializeToString())
        return value

    def replay(self, kind: int, payload: bytes) -> None:
        """Apply a logged change again (no limits: it was accepted once)."""
        if kind == records.SET:
            put = pb.SetRequest.FromString(payload)
            self._put(put.key, put.value)
        elif kind == records.DELETE:
            self.values.pop(pb.DeleteRequest.FromString(payload).key, None)
        elif kind == records.SWAP:
            swap = pb.CompareAndSwapRequest.FromString(payload)
            self._put(swap.key, swap.desired)
            self.remember(swap.request_id, swap.key, None)
        elif kind == records.ADD:
            add = pb.AddRequest.FromString(payload)
            value = self._sum(add.key, add.delta)
            self._put(add.key, str(value).encode())
            self.remember(add.request_id, add.key, value)

    def snapshot(self) -> Iterator[tuple[int, bytes]]:
        """The store as it is now, as SET and REMEMBERED records encoded lazily (from copies, so
        that a thread can write them while the store changes)."""
        return _records(dict(self.values), list(self.remembered.items()))

    async def wait(self, keys: list[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while missing := [k for k in keys if k not in self.values]:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"waited {timeout:g}s; keys still missing: {', '.join(missing[:20])}")
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                continue


def counter_sum(key: str, raw: bytes, delta: int) -> int:
    """What Add leaves in a key that holds `raw`: an int64 written in decimal."""
    try:
        value = int(raw)
    except ValueError:
        raise failed_precondition(f"key: {key!r} holds {raw[:32]!r}, not a decimal integer") from None
    value += delta
    if not -(1 << 63) <= value < 1 << 63:
        raise failed_precondition(f"key: adding {delta} to {key!r} overflows int64")
    return value


def reused_request_id(request_id: str, first_key: str, first_was_add: bool) -> ServiceError:
    call = "an Add" if first_was_add else "a CompareAndSwap"
    return invalid(f"request_id: {request_id!r} was already used by {call} of key {first_key!r}")


def _records(
    values: dict[str, bytes], remembered: list[tuple[str, tuple[str, int | None]]]
) -> Iterator[tuple[int, bytes]]:
    for key, value in values.items():
        yield records.SET, pb.SetRequest(key=key, value=value).SerializeToString()
    for request_id, (key, counter) in remembered:
        yield records.REMEMBERED, records.to_json([request_id, key, counter])
