"""Leases that lapse unless renewed, checked by one sweeper task per server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from nanodist.services.common.errors import exhausted, invalid, not_found

MIN_TTL_MS = 100
MAX_TTL_MS = 3_600_000
SWEEP_SECONDS = 0.05


def check_ttl(ttl_ms: int, field_name: str = "ttl_ms") -> int:
    if not MIN_TTL_MS <= ttl_ms <= MAX_TTL_MS:
        raise invalid(f"{field_name}: {ttl_ms} is outside [{MIN_TTL_MS}, {MAX_TTL_MS}] milliseconds")
    return ttl_ms


@dataclass
class Lease:
    lease_id: str
    ttl_ms: int
    expires: float
    on_expire: Callable[[Lease], None]
    payload: dict[str, object] = field(default_factory=dict)

    def remaining_ms(self) -> int:
        return max(0, int((self.expires - time.monotonic()) * 1000))


class LeaseTable:
    """Lease ids → leases. `on_expire` runs on the event loop when a lease lapses."""

    def __init__(self, max_leases: int = 100_000) -> None:
        self.leases: dict[str, Lease] = {}
        self.max_leases = max_leases
        self._task: asyncio.Task[None] | None = None

    def grant(self, ttl_ms: int, on_expire: Callable[[Lease], None], **payload: object) -> Lease:
        if len(self.leases) >= self.max_leases:
            raise exhausted(f"{len(self.leases)} live leases, the limit of this server (max_leases={self.max_leases})")
        lease = Lease(uuid.uuid4().hex, ttl_ms, time.monotonic() + ttl_ms / 1000, on_expire, dict(payload))
        self.leases[lease.lease_id] = lease
        return lease

    def restore(self, lease_id: str, ttl_ms: int, on_expire: Callable[[Lease], None], **payload: object) -> Lease:
        """Bring back a lease granted before a restart, under its own id, with its whole TTL from now."""
        lease = Lease(lease_id, ttl_ms, time.monotonic() + ttl_ms / 1000, on_expire, dict(payload))
        self.leases[lease_id] = lease
        return lease

    def renew(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise not_found(f"lease {lease_id!r} has lapsed or never existed")
        lease.expires = time.monotonic() + lease.ttl_ms / 1000
        return lease

    def revoke(self, lease_id: str) -> Lease | None:
        return self.leases.pop(lease_id, None)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            for lease in [lease for lease in self.leases.values() if lease.expires <= now]:
                if self.leases.pop(lease.lease_id, None) is not None:
                    lease.on_expire(lease)
