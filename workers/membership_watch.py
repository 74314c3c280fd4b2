"""Watching a job's membership while a worker waits: a peer that died or froze anywhere is named.

Every worker holds a barrier session with a short lease. A worker that dies stops renewing it, and
the service breaks the job's barrier naming it; every wait (a pull for the step, a key in the store)
runs in slices and looks at that barrier between them, so that it ends with the loss named rather
than with a silent timeout. A worker whose own session lapsed learns it is the one left behind.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import numpy as np

from nanodist.client import (
    BarrierBroken,
    BarrierClient,
    DeadlineExceeded,
    KVStore,
    NanodistError,
    NotFound,
)
from nanodist.workers.comm import CommError, Communicator
from nanodist.workers.config import JobConfig
from nanodist.workers.progress import say

T = TypeVar("T")
PULL_SLICE_MS = 500  # how often a waiting pull looks for a broken barrier
STATUS_TIMEOUT = 1.0  # seconds a watch gives the barrier service to answer


class CutOff(NanodistError):
    """This worker's session lapsed (it was frozen, or cut off from the services): the job goes on without it."""

    code = grpc.StatusCode.UNAVAILABLE


class MembershipWatch:
    """A worker's view of its job (set by Job as it forms each generation), and the watch over it."""

    config: JobConfig
    kv: KVStore
    comm: Communicator
    barrier: BarrierClient
    barrier_name: str  # the job's barrier: a lost member breaks it
    generation: int
    group_ids: list[int]  # the groups of this generation, in the order of their ranks
    group_sizes: list[int]
    rank: int
    world: int
    is_leader: bool

    @property
    def _generation_suffix(self) -> str:
        return f"/gen-{self.generation}" if self.generation else ""

    @property
    def group_index(self) -> int:
        """This worker's group's place among the groups of the generation (its --group-id in a fixed job)."""
        return self.group_ids.index(self.config.group_id)

    def _leave_when_cut_off(self) -> None:
        """Elastic: a worker whose session lapsed has been left behind, whatever it is waiting for (a
        barrier, a server's answer); it stops at once rather than when that wait times out."""
        while True:
            time.sleep(0.5)
            barrier = self.barrier
            if not barrier.closed and barrier.unrenewed_for > self.config.session_ttl + 1:
                say(
                    f"nanodist worker: error: rank {self.rank} has not reached the barrier service at "
                    f"{self.config.barrier} for {barrier.unrenewed_for:.0f} s: its session lapsed, "
                    "and the job goes on without it",
                    sys.stderr,
                )
                os._exit(1)  # the main thread may be inside a call that would wait out its timeout

    def watching_peers(self, wait: Callable[[int], T]) -> T:
        """Call wait(slice_ms), a server-side wait of at most slice_ms, until it returns.

        Between slices, look at the job's barrier: a worker that died anywhere
        breaks it when its session lapses, so a wait for its push ends with
        BarrierBroken naming it rather than a silent timeout.
        """
        began = time.monotonic()
        deadline = began + self.config.timeout
        while True:
            try:
                return wait(PULL_SLICE_MS)
            except DeadlineExceeded as slice_ended:
                try:
                    (state,) = self.barrier.status(self.barrier_name)
                except NotFound:
                    pass  # the barrier service restarted without it; the next wait there makes it again
                else:
                    if state.broken_reason:
                        raise BarrierBroken(state.broken_reason, grpc.StatusCode.ABORTED, list(state.missing)) from None
                if time.monotonic() > deadline:
                    last = slice_ended.message.split(": ", 1)[-1]  # the server's view; its figure is one slice
                    raise DeadlineExceeded(
                        f"rank {self.rank}: waited {time.monotonic() - began:.0f} s (--timeout "
                        f"{self.config.timeout:g}) for the other workers' pushes, and no worker was lost; {last}"
                    ) from None

    def membership_problem(self) -> str | None:
        """Why the group cannot go on, from the job's barrier: a member whose session lapsed broke it.

        A wait for a silent peer (frozen, or cut off by the network) calls this every half second,
        so every rank learns of the loss within the session TTL plus a second. Raises CutOff when the
        lapsed session is this worker's own: then it is the one the others go on without.
        """
        if self.barrier.unrenewed_for > self.config.session_ttl:
            raise CutOff(
                f"rank {self.rank} has not reached the barrier service at {self.config.barrier} for "
                f"{self.barrier.unrenewed_for:.0f} s: its session lapsed, and the job goes on without it"
            )
        try:
            (state,) = self.barrier.status(self.barrier_name, timeout=STATUS_TIMEOUT)
        except NanodistError:
            return None  # not known yet (a restarted service), or slow: the next look may tell
        if not state.broken_reason:
            return None
        if state.lapsed_member == self.barrier.member_id:
            raise CutOff(
                f"rank {self.rank} was named missing by the job's barrier ({state.broken_reason}): it was "
                "frozen or cut off for longer than its session's TTL, and the job goes on without it"
            )
        return state.broken_reason  # names the barrier, the member that broke it, and who is missing

    def tell_group(self, going_on: bool) -> None:
        """Elastic: the group leader tells its members, who wait for what it brings back from the servers,
        whether the step completed or the job lost a member; on a loss every rank of the group leaves the
        step at the same point (an MPI group cannot notice otherwise). Raises BarrierBroken on a member
        told of a loss."""
        flag = np.array([going_on], dtype=np.int64)
        try:
            self.comm.broadcast(flag, root=0)
        except CommError:
            if self.is_leader:
                return  # the loss is in this group: its members see their own failure
            raise
        if not flag[0]:
            raise BarrierBroken("the group's leader saw the job lose a member", grpc.StatusCode.ABORTED, [])

    def abort(self, reason: str) -> None:
        """Break the job's barrier so that every other worker stops at once, naming the cause."""
        try:
            self.barrier.abort(self.barrier_name, reason[:1000])
        except NanodistError:
            pass
