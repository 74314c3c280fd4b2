"""Barrier state: generations, arrivals, and breaking with the missing members named."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from nanodist.services.common.errors import ServiceError, exhausted, failed_precondition

MAX_WAITERS = 200_000  # Wait calls in progress on one barrier, repeats by one member included


class BarrierBroken(ServiceError):
    """A generation broke; `missing` names the members that had not arrived."""

    def __init__(self, code: grpc.StatusCode, message: str, missing: list[str]) -> None:
        super().__init__(code, message)
        self.missing = missing


@dataclass
class Barrier:
    name: str
    parties: int = 0
    generation: int = 0
    arrived: dict[str, int] = field(default_factory=dict)  # member -> arrival index
    known: set[str] = field(default_factory=set)  # members seen in sessions or earlier generations
    broken: BarrierBroken | None = None
    lapsed_member: str = ""  # whose session lapse broke it, if that is what did
    waiters: list[asyncio.Future[int]] = field(default_factory=list)  # one per Wait call in progress

    def missing(self) -> list[str]:
        return sorted(self.known - set(self.arrived))

    def describe_missing(self) -> str:
        absent = self.parties - len(self.arrived)
        names = self.missing()
        if not self.parties:  # broken before anyone waited in this generation: only its members are known
            return f"no one was waiting; its members: {', '.join(names) or 'none known'}"
        if names:
            return f"missing {absent} of {self.parties}: {', '.join(names)}"
        return f"missing {absent} of {self.parties} (members not yet known)"

    def arrive(self, member: str, parties: int) -> tuple[asyncio.Future[int], int]:
        """Register an arrival; returns a future for the generation's release and the arrival index."""
        if self.broken is not None:
            raise BarrierBroken(
                grpc.StatusCode.ABORTED,
                f"barrier {self.name!r} is broken ({self.broken.message}); call Reset to start a fresh generation",
                self.broken.missing,
            )
        if self.arrived and parties != self.parties:
            raise failed_precondition(
                f"parties: {parties} differs from {self.parties} of generation "
                f"{self.generation} of barrier {self.name!r}, in progress"
            )
        if len(self.waiters) >= MAX_WAITERS:
            raise exhausted(
                f"barrier {self.name!r} has {len(self.waiters)} Wait calls in progress (limit {MAX_WAITERS})"
            )
        self.parties = parties
        self.known.add(member)
        index = self.arrived.setdefault(member, len(self.arrived))
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        if len(self.arrived) >= parties:
            self._settle(lambda f: f.set_result(self.generation))
            self.generation += 1
            self.arrived = {}
        return future, index

    def _settle(self, settle: Callable[[asyncio.Future[int]], None]) -> None:
        for waiter in self.waiters:
            if not waiter.done():  # a waiter that timed out has cancelled its own future
                settle(waiter)
        self.waiters = []

    def break_(self, reason: str, lapsed_member: str = "") -> BarrierBroken | None:
        """Break the barrier; current waiters and later arrivals get ABORTED until Reset."""
        if self.broken is not None:
            return None
        self.lapsed_member = lapsed_member
        missing = self.missing()
        error = BarrierBroken(
            grpc.StatusCode.ABORTED,
            f"barrier {self.name!r} generation {self.generation} broke: {reason}; {self.describe_missing()}",
            missing,
        )
        self.broken = error
        self._settle(lambda f: f.set_exception(error))
        return error

    def reset(self) -> int:
        error = BarrierBroken(grpc.StatusCode.ABORTED, f"barrier {self.name!r} was reset", self.missing())
        self._settle(lambda f: f.set_exception(error))
        self.broken = None
        self.lapsed_member = ""
        self.arrived = {}
        self.generation += 1
        return self.generation
