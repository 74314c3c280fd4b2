"""LockClient: leased locks with fencing tokens, kept alive in the background."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from nanodist.client.base import ServiceClient, default_member_id
from nanodist.client.errors import NanodistError, NotFound
from nanodist.client.retry import RetryPolicy
from nanodist.client.rpc import ClientSecurity
from nanodist.v1 import lock_pb2 as pb
from nanodist.v1 import lock_pb2_grpc


@dataclass
class Held:
    """A granted lock. `lost` is set if the lease lapsed before release (the token is then stale)."""

    name: str
    lease_id: str
    fencing_token: int
    ttl: float
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)


class LockClient(ServiceClient):
    """Named locks (FIFO, exclusive or shared) held by `owner` under leases with fencing tokens.

    Acquire carries a request id, so a retry after UNAVAILABLE gets back the
    lease a lost response granted; the background renewal keeps trying through
    a restart of the service, which keeps held locks when it has --state-dir.
    """

    def __init__(
        self,
        address: str,
        owner: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        super().__init__(address, timeout=timeout, retry=retry, security=security)
        self.owner = owner or default_member_id()
        self._stub = lock_pb2_grpc.LockStub(self._channel)

    def _request(self, name: str, ttl: float, shared: bool, request_id: str, wait: float = 0) -> pb.AcquireRequest:
        return pb.AcquireRequest(
            name=name,
            owner=self.owner,
            ttl_ms=int(ttl * 1000),
            wait_timeout_ms=int(wait * 1000),
            mode=pb.SHARED if shared else pb.EXCLUSIVE,
            request_id=request_id,
        )

    @staticmethod
    def _held(name: str, response: pb.AcquireResponse) -> Held:
        return Held(name, response.lease_id, response.fencing_token, response.ttl_ms / 1000)

    def acquire(self, name: str, ttl: float = 10.0, timeout: float = 60.0, shared: bool = False) -> Held:
        """Wait up to `timeout` seconds for the lock (FIFO); DeadlineExceeded names the holder.

        A retry after a restart of the service queues again, behind those that reconnected first."""
        request_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout

        def attempt() -> pb.AcquireResponse:
            left = max(0.001, deadline - time.monotonic())
            return self._stub.Acquire(self._request(name, ttl, shared, request_id, left), timeout=left + 10)

        return self._held(name, self._retried(attempt, within=timeout))

    def try_acquire(self, name: str, ttl: float = 10.0, shared: bool = False) -> Held | None:
        request = self._request(name, ttl, shared, uuid.uuid4().hex)
        response = self._call(self._stub.TryAcquire, request, idempotent=True)
        return self._held(name, response) if response.acquired else None

    def release(self, held: Held) -> None:
        held._stop.set()
        request = pb.ReleaseRequest(name=held.name, lease_id=held.lease_id)
        self._call(self._stub.Release, request, idempotent=True)

    def keep_alive(self, held: Held) -> None:
        self._call(self._stub.KeepAlive, pb.KeepAliveRequest(lease_ids=[held.lease_id]), idempotent=True)

    def _renew_until_released(self, held: Held) -> None:
        # One try per third of the TTL, each bounded by it, so that release never waits long for this
        # thread; a service that restarts with --state-dir gives the lease its whole TTL again, so the
        # first try after the restart is in time.
        interval = held.ttl / 3
        request = pb.KeepAliveRequest(lease_ids=[held.lease_id])
        while not held._stop.wait(interval):
            try:
                self._call(self._stub.KeepAlive, request, timeout=interval)
            except NotFound:
                held.lost = True
                return
            except NanodistError:
                continue  # unreachable for now: the lease has slack for two more tries

    @contextmanager
    def lock(self, name: str, ttl: float = 10.0, timeout: float = 60.0, shared: bool = False) -> Iterator[Held]:
        """`with client.lock("name") as held:` — the lease is renewed until the block exits."""
        held = self.acquire(name, ttl, timeout, shared)
        renewer = threading.Thread(target=self._renew_until_released, args=(held,), daemon=True)
        renewer.start()
        try:
            yield held
        finally:
            held._stop.set()
            renewer.join()
            if not held.lost:
                self.release(held)

    def status(self, name: str = "") -> list[pb.LockState]:
        return list(self._call(self._stub.Status, pb.LockStatusRequest(name=name), idempotent=True).locks)
