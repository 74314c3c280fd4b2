"""A worker's place in a job: its group, its global rank, and its clients of the services.

The numpy worker and nanodist.torch join the same way: the group forms over
MPI or TCP, every group leader publishes its group's size in the key-value
store so that everyone learns the world size and its global rank, and the
workers that talk to the parameter servers (the leaders, or everyone in flat
mode) connect to the shards. A barrier session with a short lease lets every
wait notice a worker that died anywhere.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import numpy as np

from nanodist.client import (
    BarrierBroken,
    BarrierClient,
    ClientSecurity,
    DeadlineExceeded,
    KVStore,
    Membership,
    NanodistError,
    NotFound,
    ParameterServerClient,
    Values,
)
from nanodist.client.health import wait_serving
from nanodist.workers.comm import CommError, Communicator, from_env
from nanodist.workers.config import ConfigError, JobConfig
from nanodist.workers.progress import say

T = TypeVar("T")
SESSION_TTL = 5.0  # seconds: how long a dead worker goes unnoticed
PULL_SLICE_MS = 500  # how often a waiting pull looks for a broken barrier
STATUS_TIMEOUT = 1.0  # seconds a watch gives the barrier service to answer


class _GroupClosed(ConfigError):
    """The group's generation formed before this worker arrived."""


def _groups_missing(num_groups: int, error: NanodistError) -> ConfigError:
    return ConfigError(f"not every one of the {num_groups} groups showed up: {error.message}")


class JobFinished(Exception):
    """Elastic: the job finished while this worker waited for a place in it; there is nothing left to do."""


class CutOff(NanodistError):
    """This worker's session lapsed (it was frozen, or cut off from the services): the job goes on without it."""

    code = grpc.StatusCode.UNAVAILABLE


class Job:
    """Joins the group and the job; owns the key-value, barrier and parameter-server clients."""

    def __init__(
        self,
        config: JobConfig,
        security: ClientSecurity | None = None,
        *,
        every_rank_pushes: bool = False,
        check: Callable[[int, int], None] | None = None,
    ) -> None:
        """every_rank_pushes: each rank of a group talks to the servers (a pipeline's stages own their keys).
        check(rank, world) runs once the job has formed and before the servers are reached, so that
        settings that cannot work are named before an absent server is."""
        config.validate()
        self.config = config
        self.security = security
        self.every_rank_pushes = every_rank_pushes
        self.identity = f"{socket.gethostname()}:{os.getpid()}"  # names this worker across generations
        self.generation = 0  # elastic jobs re-form the group after a loss: generation 1, 2, ...
        self._worlds: dict[int, int] = {}  # the world size of each earlier generation
        self.joined_late = False  # elastic: this worker entered a group already training
        self.kv = KVStore(config.lock, timeout=config.timeout, security=security)
        self._services_ready = False
        self._expected: int | None = None  # members the next generation can close with at once
        self._expected_groups = config.num_groups  # groups the next generation can close with at once
        self._group_waiting = False  # elastic: this group is counted in <run>/joining-groups
        self._boundaries = 0  # admit_joiners calls in this generation, all ranks in step
        self.group_ids: list[int] = []  # the groups of this generation, in the order of their ranks
        if config.elastic:
            self._await_services()
            self.generation = self._current_generation()
        self.ps: ParameterServerClient | None = None
        self._collectives: ThreadPoolExecutor | None = None
        self._reader: ParameterServerClient | None = None
        self._form(check)
        if config.elastic and self.generation:
            self.joined_late = True  # the others resume from the servers: so does this worker
        if config.elastic:
            threading.Thread(target=self._leave_when_cut_off, name="nanodist-cut-off-watch", daemon=True).start()

    def _leave_when_cut_off(self) -> None:
        """Elastic: a worker whose session lapsed has been left behind, whatever it is waiting for (a
        barrier, a server's answer); it stops at once rather than when that wait times out."""
        while True:
            time.sleep(0.5)
            barrier = self.barrier
            if not barrier.closed and barrier.unrenewed_for > SESSION_TTL + 1:
                say(
                    f"nanodist worker: error: rank {self.rank} has not reached the barrier service at "
                    f"{self.config.barrier} for {barrier.unrenewed_for:.0f} s: its session lapsed, "
                    "and the job goes on without it",
                    sys.stderr,
                )
                os._exit(1)  # the main thread may be inside a call that would wait out its timeout

    def _await_services(self) -> None:
        """Every worker joins through the lock service and the barrier: wait until both serve."""
        if not self._services_ready:
            wait_serving([self.config.lock, self.config.barrier], self.config.timeout, say, self.security)
            self._services_ready = True

    def _form(self, check: Callable[[int, int], None] | None = None) -> None:
        """Join this generation's group, learn the world, and open the clients that depend on the rank."""
        c = self.config
        if c.backend == "tcp":
            self._await_services()  # its members meet through the lock service
        while True:
            self.comm = self._join_group()
            self._await_services()  # an MPI group forms without them: a wrong size is named first
            try:
                self.group_ids, self.group_sizes = self._groups()
            except _GroupClosed as closed:  # elastic: the whole group came after the generation closed
                self._wait_as_group(str(closed))
                continue
            if self._group_waiting and self.comm.rank == 0:
                self.kv.add(f"{c.run_id}/joining-groups", -1)
            self._group_waiting = False
            break
        self._boundaries = 0
        position = self.group_index
        self.world = sum(self.group_sizes)
        self.rank = sum(self.group_sizes[:position]) + self.comm.rank
        # The servers average the pushes of the groups; scaling each group's mean by its share makes that
        # average the mean over all workers even when groups differ in size.
        self.push_scale = self.group_sizes[position] * len(self.group_ids) / self.world
        self.is_leader = self.comm.rank == 0
        self.pushes = c.flat or self.is_leader or self.every_rank_pushes
        self.barrier_name = f"{c.run_id}/epoch{self._generation_suffix}"
        if check is not None:
            check(self.rank, self.world)
        if self.pushes and self.ps is None:
            self.ps = self._connect_ps(self.security)
        elif not self.pushes and self.ps is not None:  # a leader that became a member of a new generation
            self.ps.close()
            self.ps = None
        if self.ps is not None and c.elastic:
            # The servers count this generation's pushes; generations are numbered from 1 on the wire.
            self.ps.worker_id = self.pusher_id
            self.ps.membership = Membership(self.generation + 1, self.world if c.flat else len(self.group_ids))
        self.barrier = BarrierClient(
            c.barrier,
            f"{c.run_id}/rank-{self.rank}{self._generation_suffix}",
            session_ttl=SESSION_TTL,
            barriers=[self.barrier_name],
            timeout=c.timeout,
            security=self.security,
        )
        self.comm.watch(self.membership_problem)
        if c.elastic:
            if self.rank == 0:
                self.kv.set(f"{c.run_id}/generation", str(self.generation))
            if self.comm.rank == 0:
                self.kv.set(self._backend_key(c.group_id), c.backend)  # see regroup_after_loss
            self._record_members()

    @property
    def _generation_suffix(self) -> str:
        return f"/gen-{self.generation}" if self.generation else ""

    def regroup(self, cause: str, expected: int | None = None, expected_groups: int | None = None) -> None:
        """Elastic: after the job lost a member, form the next generation with the workers that are left.

        Every survivor calls this once it has seen the loss (a failed collective, a broken barrier). In
        a TCP group the first to arrive becomes its rank 0 and closes the group once --regroup-window
        passes without a newcomer, or once `expected` members have arrived; an MPI group keeps its ranks.
        The groups then make the generation (see _groups): `expected_groups` close it at once.
        Raises ConfigError when fewer than --min-workers are left.
        """
        say(f"[{self.config.run_id}] rank {self.rank} leaves generation {self.generation}: {cause}")
        self.comm.watch(lambda: None)  # the barrier it watches is about to go
        self.comm.close()
        self.barrier.close()
        self._worlds[self.generation] = self.world
        self.generation += 1
        self._expected, self._expected_groups = expected, expected_groups or len(self.group_ids)
        try:
            self._form()
        finally:
            self._expected = None
        if self.world < self.config.min_workers:
            raise ConfigError(
                f"only {self.world} workers are left in generation {self.generation}, fewer than "
                f"--min-workers {self.config.min_workers}; {self._departures()}"
            )

    def regroup_after_loss(
        self, cause: str, before: Callable[[], None] = lambda: None, *, in_group: bool = True
    ) -> None:
        """Elastic, on a rank that saw a member lost (a failed collective, a broken barrier): break the
        job's barrier so that the others learn at once, then form the next generation with those left.
        `before` runs once the old group is closed, to drain work queued on it. in_group: the loss was
        seen in this worker's own group (a collective failed), so the group waits for one fewer.
        Raises CutOff if the others have gone on without this worker."""
        self.membership_problem()
        lost = self._lapsed_group()  # read before the abort below names this rank as the cause
        self.abort(f"rank {self.rank} lost a member of the job: {cause}")
        self.comm.close()
        before()
        here = self.group_index
        size = self.group_sizes[here]
        # One lost: the group closes as soon as the rest are back. A collective that failed says it was
        # this group; otherwise the barrier names whose session lapsed, and with one group it is this one.
        mine = in_group or len(self.group_ids) == 1 or lost == here
        groups = len(self.group_ids)
        if lost is not None and lost != here and self._backend_of(self.group_ids[lost]) == "mpi":
            groups -= 1  # an MPI group leaves whole and comes back later: the others need not wait for it
        self.regroup(cause, expected=size - 1 if mine else size, expected_groups=groups)

    def _lapsed_group(self) -> int | None:
        """The place, among this generation's groups, of the group whose member's session lapsed and
        broke the job's barrier; None if no session lapsed (a member failed, or it is not known yet)."""
        try:
            (state,) = self.barrier.status(self.barrier_name, timeout=STATUS_TIMEOUT)
        except NanodistError:
            return None
        prefix, suffix = f"{self.config.run_id}/rank-", self._generation_suffix
        member = state.lapsed_member
        if not (member.startswith(prefix) and member.endswith(suffix)):
            return None
        rank_text = member[len(prefix) : len(member) - len(suffix)]
        if not rank_text.isdigit():
            return None
        bounds = np.cumsum(self.group_sizes)
        place = int(np.searchsorted(bounds, int(rank_text), side="right"))
        return place if place < len(self.group_ids) else None

    def _backend_key(self, group_id: int) -> str:
        return f"{self.config.run_id}/group-{group_id}/backend"

    def _backend_of(self, group_id: int) -> str:
        try:
            return self.kv.get(self._backend_key(group_id)).decode()
        except NanodistError:
            return "tcp"

    def admit_joiners(self) -> bool:
        """Elastic, where every rank stands at the same point (an epoch boundary, a commit): if workers
        wait to join and the group is below --max-workers, form the next generation with them. Rank 0
        decides and tells the others, so that all agree. Returns whether a new generation formed."""
        c = self.config
        self._boundaries += 1
        waiting = np.zeros(1 + c.num_groups, dtype=np.int64)  # groups that wait whole, then each group's joiners
        if self.rank == 0:
            if not c.max_workers or self.world < c.max_workers:
                waiting[0] = max(0, self.kv.add(f"{c.run_id}/joining-groups", 0))
                for g in self.group_ids:
                    waiting[1 + g] = max(0, self.kv.add(self._joiners_key(g), 0))
            if len(self.group_ids) > 1:  # the other groups' leaders read it
                self.kv.set(self._decision_key, ",".join(map(str, waiting)))
        elif self.is_leader:
            self.watching_peers(lambda slice_ms: self.kv.wait([self._decision_key], timeout=slice_ms / 1000))
            waiting[:] = [int(n) for n in self.kv.get(self._decision_key).decode().split(",")]
        self.comm.broadcast(waiting, root=0)  # fails at once if the leader is lost
        if not waiting.any():
            return False
        world, size = self.world, self.group_sizes[self.group_index]
        self.regroup(
            "workers wait to join",
            expected=size + int(waiting[1 + c.group_id]),
            expected_groups=len(self.group_ids) + int(waiting[0]),
        )
        if self.rank == 0 and self.world <= world:  # counted joiners that never came (killed while waiting)
            for key in [f"{c.run_id}/joining-groups", *(self._joiners_key(g) for g in range(c.num_groups))]:
                self.kv.set(key, "0")
        return True

    @property
    def _decision_key(self) -> str:
        return f"{self.config.run_id}/admit{self._generation_suffix}/{self._boundaries}"

    def _joiners_key(self, group_id: int) -> str:
        """The count of workers that wait to enter TCP group `group_id`."""
        return f"{self.config.run_id}/group-{group_id}/joiners"

    def _record_members(self) -> None:
        """Every member publishes who it is; the new rank 0 logs once who left and who joined."""
        key = f"{self.config.run_id}/members{self._generation_suffix}"
        self.kv.set(f"{key}/{self.rank}", self.identity)
        if self.rank == 0 and self.generation:
            say(
                f"[{self.config.run_id}] generation {self.generation}: {self.world} workers "
                f"(was {self._worlds[self.generation - 1]}); {self._departures()}"
            )

    def _members(self, generation: int) -> dict[int, str]:
        """rank -> identity of a generation's members."""
        suffix = f"/gen-{generation}" if generation else ""
        world = self._worlds.get(generation, self.world)
        keys = [f"{self.config.run_id}/members{suffix}/{r}" for r in range(world)]
        self.kv.wait(keys, timeout=self.config.timeout)  # every member records itself as it enters
        return {r: self.kv.get(key).decode() for r, key in enumerate(keys)}

    def _departures(self) -> str:
        """Who left since the previous generation and who joined, by their old ranks and identities."""
        before, now = self._members(self.generation - 1), set(self._members(self.generation).values())
        left = [f"rank {r} ({who})" for r, who in sorted(before.items()) if who not in now]
        joined = sorted(now - set(before.values()))
        return f"left: {', '.join(left) or 'none'}; joined: {', '.join(joined) or 'none'}"

    def _join_group(self) -> Communicator:
        c = self.config
        if c.backend == "tcp":
            if c.elastic:
                rank, size = self._join_generation()
            elif c.group_size == 0:
                rank, size = self._counted_rank(self._group)
            else:
                rank, size = None, c.group_size
            comm = from_env("tcp", store=self.kv, world_size=size, rank=rank, group=self._group, timeout=c.timeout)
        else:
            comm = from_env(c.backend)
            if c.elastic and not self.group_ids:  # a new process: its ranks may have read different generations
                generation = np.array([self.generation], dtype=np.int64)
                comm.broadcast(generation, root=0)
                self.generation = int(generation[0])
        if c.group_size and comm.size != c.group_size:
            comm.close()
            raise ConfigError(
                f"group-size mismatch: --group-size {c.group_size} but the {c.backend} group has {comm.size} ranks"
            )
        return comm

    @property
    def _group(self) -> str:
        return f"{self.config.run_id}/group-{self.config.group_id}{self._generation_suffix}"

    def _counted_rank(self, group: str) -> tuple[int, int]:
        """--group-size 0: members take ranks from a counter; rank 0 closes the group once no one
        has joined for --join-window seconds (as torchelastic's last call; --regroup-window for a later
        generation), or once --max-workers or every expected member have, then publishes its size."""
        c = self.config
        rank = self.kv.add(f"{group}/joined", 1) - 1
        size_key = f"{group}/size"
        window = c.regroup_window if self.generation else c.join_window
        bounds = [n for n in (c.max_workers, self._expected) if n]
        enough = min(bounds) if bounds else 0  # members that close the group at once
        if rank == 0:
            seen, stable_since = 1, time.monotonic()
            while time.monotonic() - stable_since < window and not 0 < enough <= seen:
                time.sleep(min(0.2, window / 5))
                now = self.kv.add(f"{group}/joined", 0)
                if now != seen:
                    seen, stable_since = now, time.monotonic()
            self.kv.set(size_key, str(min(seen, c.max_workers or seen)))
        self.kv.wait([size_key], timeout=c.timeout + window)
        size = int(self.kv.get(size_key))
        if rank >= size:
            raise _GroupClosed(f"joined group {group!r} as member {rank + 1} after it closed with {size} members")
        say(f"[{group}] member {rank} of {size}")
        return rank, size

    def _current_generation(self) -> int:
        """The generation an elastic job trains in now (0 before its first group forms)."""
        try:
            return int(self.kv.get(f"{self.config.run_id}/generation"))
        except NotFound:
            return 0

    def _join_generation(self) -> tuple[int, int]:
        """--elastic: join this generation's group or, once it has closed, wait to enter the next one.

        A late worker counts itself in `<run>/group-<id>/joiners`; rank 0 looks there at every epoch boundary
        and, while the group is below --max-workers, has everyone form the next generation, which
        the late worker joins after its first member (so that a member of the old generation, who
        knows where training is, leads it).
        """
        c = self.config
        joiners = self._joiners_key(c.group_id)
        waiting_since: float | None = None
        while True:
            try:
                joined = self._counted_rank(self._group)
            except _GroupClosed:
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    say(f"[{c.run_id}] generation {self.generation} is training; waiting to join the next one")
                    self.kv.add(joiners, 1)  # counted once: it stays counted until it gets in
                following = f"{c.run_id}/group-{c.group_id}/gen-{self.generation + 1}/joined"
                self._await_next(following, waiting_since)
                continue
            if waiting_since is not None:
                self.kv.add(joiners, -1)
                self.joined_late = True
            return joined

    def _await_next(self, following: str, waiting_since: float) -> None:
        """Wait for the key that the next generation's first member makes, looking every second whether
        the job has finished; then move to that generation."""
        c = self.config
        while True:
            left = c.timeout - (time.monotonic() - waiting_since)
            if left <= 0:
                raise ConfigError(
                    f"waited {c.timeout:g} s (--timeout) to join run {c.run_id!r}, and its group formed no new "
                    f"generation: it is full (--max-workers {c.max_workers}) or never reached an epoch boundary"
                )
            try:
                self.kv.wait([following], timeout=min(1.0, left))
                break
            except DeadlineExceeded:
                if self._has_finished():
                    raise JobFinished(f"run {c.run_id!r} finished while this worker waited for a place in it") from None
        self.generation += 1

    def _has_finished(self) -> bool:
        return self._exists(self._finished_key)

    @property
    def _finished_key(self) -> str:
        return f"{self.config.run_id}/finished"

    def finished(self) -> None:
        """Elastic: rank 0 marks the job done, so that a worker still waiting to join stops (exit 0)."""
        if self.config.elastic and self.rank == 0:
            self.kv.set(self._finished_key, "1")

    def _groups(self) -> tuple[list[int], list[int]]:
        """The groups of this generation and their sizes, in the order of their ranks.

        Every group leader publishes its size. A fixed job waits for all of --num-groups; in an elastic
        one the leaders register, and the first closes the generation (see _close_generation). Raises
        _GroupClosed, on every rank of a group, when the group came after its generation closed.
        """
        c = self.config
        sizes = f"{c.run_id}/group-size{self._generation_suffix}"
        if not c.elastic:
            if self.comm.rank == 0:
                self.kv.set(f"{sizes}/{c.group_id}", str(self.comm.size))
            ids = list(range(c.num_groups))
        else:
            admitted = np.array([self._register(sizes) if self.comm.rank == 0 else 0], dtype=np.int64)
            self.comm.broadcast(admitted, root=0)  # the leader alone knows when it registered
            if not admitted[0]:
                raise _GroupClosed(f"group {c.group_id} came after generation {self.generation} closed")
            ids = [int(g) for g in self.kv.get(f"{sizes}/list").decode().split(",")]
        keys = [f"{sizes}/{g}" for g in ids]
        try:
            self.kv.wait(keys, timeout=c.timeout)
        except NanodistError as error:
            raise _groups_missing(c.num_groups, error) from None
        return ids, [int(self.kv.get(k)) for k in keys]

    def _register(self, sizes: str) -> bool:
        """Elastic, on a group leader: enter this group in the generation, unless the generation has
        closed (its list may name this group's earlier incarnation, a group since restarted)."""
        c = self.config
        listed = f"{sizes}/list"
        if self._exists(listed):
            return False
        if not self.group_ids:  # a group new to the job: it cannot lead, not knowing where training is
            self.kv.set(f"{sizes}/new/{c.group_id}", "1")
        self.kv.set(f"{sizes}/{c.group_id}", str(self.comm.size))
        if self.kv.add(f"{sizes}/arrived", 1) == 1:
            self._close_generation(sizes)
        try:
            self.kv.wait([listed], timeout=c.timeout + c.regroup_window)
        except DeadlineExceeded as error:
            raise _groups_missing(c.num_groups, error) from None
        return c.group_id in [int(g) for g in self.kv.get(listed).decode().split(",")]

    def _close_generation(self, sizes: str) -> None:
        """Elastic, on the first group leader to arrive: decide which groups make this generation.

        The first generation waits (up to --timeout) for all --num-groups; a later one closes when the
        groups expected are in or --regroup-window passes without a new one (a group lost whole, such
        as an MPI group that lost a rank). Groups that trained in the last generation come first, so
        that rank 0 is a worker that knows where training is.
        """
        c = self.config
        if not self.generation:
            try:
                self.kv.wait([f"{sizes}/{g}" for g in range(c.num_groups)], timeout=c.timeout)
            except DeadlineExceeded as error:
                raise _groups_missing(c.num_groups, error) from None
        arrived_key, seen, stable_since = f"{sizes}/arrived", 1, time.monotonic()
        while seen < self._expected_groups and time.monotonic() - stable_since < c.regroup_window:
            time.sleep(0.1)
            now = self.kv.add(arrived_key, 0)
            if now != seen:
                seen, stable_since = now, time.monotonic()
        present = [g for g in range(c.num_groups) if self._exists(f"{sizes}/{g}")]
        order = sorted(present, key=lambda g: (self.generation > 0 and self._exists(f"{sizes}/new/{g}"), g))
        self.kv.set(f"{sizes}/list", ",".join(map(str, order)))

    def _exists(self, key: str) -> bool:
        try:
            self.kv.get(key)
        except NotFound:
            return False
        return True

    def _wait_as_group(self, why: str) -> None:
        """Elastic: this whole group (a restarted MPI group, say) came after its generation closed. Its
        leader counts it in `<run>/joining-groups`, which rank 0 reads at every epoch boundary; every
        rank waits for the next generation, and the group enters it."""
        c = self.config
        say(f"[{c.run_id}] {why}; waiting to join the next one")
        if self.comm.rank == 0 and not self._group_waiting:
            self.kv.add(f"{c.run_id}/joining-groups", 1)
            self._group_waiting = True
        self.comm.close()
        self._await_next(f"{c.run_id}/group-size/gen-{self.generation + 1}/arrived", time.monotonic())

    def _connect_ps(self, security: ClientSecurity | None) -> ParameterServerClient:
        c = self.config
        worker_id = self.pusher_id
        client = ParameterServerClient(list(c.ps), worker_id=worker_id, timeout=c.timeout, security=security)
        try:
            wait_serving(c.ps, c.timeout, say, security)
        except NanodistError as error:
            client.close()
            raise ConfigError(f"{error.message}; check --ps") from None
        return client

    @property
    def group_index(self) -> int:
        """This worker's group's place among the groups of the generation (its --group-id in a fixed job)."""
        return self.group_ids.index(self.config.group_id)

    @property
    def pusher_id(self) -> int:
        """This worker's worker_id at the servers: its rank in flat mode, else its group's place."""
        return self.rank if self.config.flat else self.group_index

    def reader(self) -> ParameterServerClient:
        """A parameter-server client on every rank (for reads such as embedding rows): the pushing
        client where this worker has one."""
        if self.ps is not None:
            return self.ps
        if self._reader is None:
            self._reader = self._connect_ps(self.security)
        return self._reader

    def client(self) -> ParameterServerClient:
        """The parameter-server client; only workers that push (leaders, or all in flat mode) have one."""
        if self.ps is None:
            raise RuntimeError(f"rank {self.rank} does not talk to the parameter servers; its group leader does")
        return self.ps

    def collectives(self) -> ThreadPoolExecutor:
        """The one thread that runs background collectives of the group (gradient buckets, embedding
        rows): collectives must start in the same order on every rank, so they never run on two threads."""
        if self._collectives is None:
            self._collectives = ThreadPoolExecutor(1, thread_name_prefix="nanodist-comm")
        return self._collectives

    def pull_watching_peers(
        self, keys: list[str], *, min_version: int = 0, clock: int = 0, out: Mapping[str, np.ndarray] | None = None
    ) -> Values:
        """Pull (into `out`'s arrays), waiting for the step (BSP) or the slowest worker (SSP); see watching_peers."""
        ps = self.client()
        return self.watching_peers(
            lambda slice_ms: ps.pull(keys, min_version=min_version, clock=clock, timeout_ms=slice_ms, out=out)
        )

    def watching_peers(self, wait: Callable[[int], T]) -> T:
        """Call wait(slice_ms), a server-side wait of at most slice_ms, until it returns.

        Between slices, look at the job's barrier: a worker that died anywhere
        breaks it when its session lapses, so a wait for its push ends with
        BarrierBroken naming it rather than a silent timeout.
        """
        deadline = time.monotonic() + self.config.timeout
        while True:
            try:
                return wait(PULL_SLICE_MS)
            except DeadlineExceeded:
                try:
                    (state,) = self.barrier.status(self.barrier_name)
                except NotFound:
                    pass  # the barrier service restarted without it; the next wait there makes it again
                else:
                    if state.broken_reason:
                        raise BarrierBroken(state.broken_reason, grpc.StatusCode.ABORTED, list(state.missing)) from None
                if time.monotonic() > deadline:
                    raise

    def membership_problem(self) -> str | None:
        """Why the group cannot go on, from the job's barrier: a member whose session lapsed broke it.

        A wait for a silent peer (frozen, or cut off by the network) calls this every half second,
        so every rank learns of the loss within the session TTL plus a second. Raises CutOff when the
        lapsed session is this worker's own: then it is the one the others go on without.
        """
        if self.barrier.unrenewed_for > SESSION_TTL:
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

    def close(self) -> None:
        if self._collectives is not None:
            self._collectives.shutdown(wait=True)
        self.barrier.close()
        self.kv.close()
        for client in (self.ps, self._reader):
            if client is not None:
                client.close()
        self.comm.close()
