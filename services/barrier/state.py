"""Barrier state: generations, arrivals, and breaking with the missing members named."""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from nanodist.services.common.errors import ServiceError, exhausted, failed_precondition

MAX_WAITERS = 200_000  # Wait calls in progress on one barrier, repeats by one member included
MAX_RELEASED_IDS = 65536  # request ids of released arrivals kept for retries


def remember_released(
    released: MutableMapping[str, Any], arrivals: dict[str, int], generation: int, keep: int = MAX_RELEASED_IDS
) -> None:
    """Keep the request ids of a released generation's arrivals, dropping the oldest past `keep`."""
    for request_id, index in arrivals.items():
        released[request_id] = (generation, index)
    for oldest in list(itertools.islice(released, max(0, len(released) - keep))):
        del released[oldest]


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
    arrival_ids: dict[str, int] = field(default_factory=dict)  # request id -> arrival index, this generation
    released_ids: OrderedDict[str, tuple[int, int]] = field(default_factory=OrderedDict)  # -> (generation, index)

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

    def arrive(self, member: str, parties: int, request_id: str = "") -> tuple[asyncio.Future[int], int]:
        """Register an arrival; returns a future for the generation's release and the arrival index."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if request_id in self.released_ids:  # a retry of an arrival already released: its answer again
            generation, index = self.released_ids[request_id]
            future.set_result(generation)
            return future, index
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
        if request_id:
            self.arrival_ids[request_id] = index
        self.waiters.append(future)
        if len(self.arrived) >= parties:
            self._settle(lambda f: f.set_result(self.generation))
            remember_released(self.released_ids, self.arrival_ids, self.generation)
            self.generation += 1
            self.arrived, self.arrival_ids = {}, {}
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
        self.arrived, self.arrival_ids = {}, {}
        self.generation += 1
        return self.generation
