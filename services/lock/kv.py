"""The key-value store with atomics that lives on the lock server."""

from __future__ import annotations

import asyncio

from nanodist.services.common.errors import exhausted, failed_precondition, invalid, not_found


class KeyValueStore:
    def __init__(self, max_value_bytes: int, max_keys: int = 1_000_000) -> None:
        self.values: dict[str, bytes] = {}
        self.max_value_bytes = max_value_bytes
        self.max_keys = max_keys
        self.changed = asyncio.Event()  # replaced after each set, so waiters wake once per change

    def check_value(self, value: bytes, field: str = "value") -> bytes:
        if len(value) > self.max_value_bytes:
            raise invalid(f"{field}: {len(value)} bytes, at most {self.max_value_bytes} allowed")
        return value

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def get(self, key: str) -> bytes:
        value = self.values.get(key)
        if value is None:
            raise not_found(f"key: {key!r} does not exist")
        return value

    def set(self, key: str, value: bytes) -> None:
        self.check_value(value)
        if key not in self.values and len(self.values) >= self.max_keys:
            raise exhausted(f"key: the store holds {len(self.values)} keys, its limit (--max-keys)")
        self.values[key] = value
        self._notify()

    def delete(self, key: str) -> bool:
        return self.values.pop(key, None) is not None

    def compare_and_swap(
        self, key: str, expected: bytes, expect_absent: bool, desired: bytes
    ) -> tuple[bool, bytes | None]:
        self.check_value(desired, "desired")
        current = self.values.get(key)
        matches = current is None if expect_absent else current == expected
        if matches:
            self.set(key, desired)
            return True, desired
        return False, current

    def add(self, key: str, delta: int) -> int:
        raw = self.values.get(key, b"0")
        try:
            value = int(raw)
        except ValueError:
            raise failed_precondition(f"key: {key!r} holds {raw[:32]!r}, not a decimal integer") from None
        value += delta
        if not -(1 << 63) <= value < 1 << 63:
            raise failed_precondition(f"key: adding {delta} to {key!r} overflows int64")
        self.set(key, str(value).encode())
        return value

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
