"""KVStore: the lock server's key-value store, shaped like torch.distributed's Store."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from nanodist.client.base import ServiceClient
from nanodist.client.retry import RetryPolicy
from nanodist.client.rpc import ClientSecurity
from nanodist.v1 import lock_pb2 as pb
from nanodist.v1 import lock_pb2_grpc


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


class KVStore(ServiceClient):
    """set/get/add/compare_set/wait/delete_key on bytes values (str is UTF-8 encoded).

    Every call rides through a restart of the lock service that fits in its
    timeout: UNAVAILABLE is retried, and add and compare_set carry a request id
    so that a retry of one the server applied is answered, not applied again.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        super().__init__(address, timeout=timeout, retry=retry, security=security)
        self._stub = lock_pb2_grpc.KeyValueStub(self._channel)

    def set(self, key: str, value: bytes | str) -> None:
        self._call(self._stub.Set, pb.SetRequest(key=key, value=_bytes(value)), idempotent=True)

    def get(self, key: str) -> bytes:
        """The value; NotFound if absent (use wait() to block for it)."""
        return self._call(self._stub.Get, pb.GetRequest(key=key), idempotent=True).value

    def add(self, key: str, delta: int = 1) -> int:
        """Atomically add to a counter (absent = 0) and return the new value, exactly once."""
        request = pb.AddRequest(key=key, delta=delta, request_id=uuid.uuid4().hex)
        return self._call(self._stub.Add, request, idempotent=True).value

    def compare_set(self, key: str, expected: bytes | str | None, desired: bytes | str) -> tuple[bool, bytes | None]:
        """Store `desired` if the key holds `expected` (None: if absent). Returns (swapped, value now)."""
        request = pb.CompareAndSwapRequest(
            key=key,
            expected=_bytes(expected or b""),
            expect_absent=expected is None,
            desired=_bytes(desired),
            request_id=uuid.uuid4().hex,
        )
        response = self._call(self._stub.CompareAndSwap, request, idempotent=True)
        return response.swapped, response.value if response.exists else None

    def delete_key(self, key: str) -> bool:
        return self._call(self._stub.Delete, pb.DeleteRequest(key=key), idempotent=True).deleted

    def wait(self, keys: Iterable[str], timeout: float = 60.0) -> None:
        """Block until every key exists; DeadlineExceeded names the missing keys."""
        names = list(keys)
        deadline = time.monotonic() + timeout

        def attempt() -> pb.WaitKeysResponse:
            left = max(0.001, deadline - time.monotonic())  # a retry waits only for what is left
            return self._stub.Wait(pb.WaitKeysRequest(keys=names, timeout_ms=int(left * 1000) or 1), timeout=left + 10)

        self._retried(attempt, within=timeout)
