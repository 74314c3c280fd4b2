"""Elastic generations: a job re-forms after it loses a member, and takes in workers that wait to join.

Each generation has its own group, ranks and barrier, agreed through the lock service's key-value
store: a TCP group's members take ranks from a counter and its first member closes the group after a
window; the group leaders then decide which groups make the generation. Workers that come late wait,
counted, for rank 0 to let them in at an epoch boundary. Rank 0 logs who left and who joined.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from nanodist.client import DeadlineExceeded, NanodistError, NotFound
from nanodist.workers.config import ConfigError
from nanodist.workers.membership_watch import STATUS_TIMEOUT, MembershipWatch
from nanodist.workers.progress import say


class GroupClosed(ConfigError):
    """The group's generation formed before this worker arrived."""


def groups_missing(num_groups: int, error: NanodistError) -> ConfigError:
    return ConfigError(f"not every one of the {num_groups} groups showed up: {error.message}")


class JobFinished(Exception):
    """Elastic: the job finished while this worker waited for a place in it; there is nothing left to do."""


class Generations(MembershipWatch):
    """The elastic half of Job: leaving a generation, forming the next, and letting joiners in."""

    identity: str  # names this worker across generations
    joined_late: bool
    _worlds: dict[int, int]  # the world size of each earlier generation
    _expected: int | None  # members the next generation can close with at once
    _expected_groups: int  # groups the next generation can close with at once
    _group_waiting: bool  # this group is counted in <run>/joining-groups
    _boundaries: int  # admit_joiners calls in this generation, all ranks in step

    def _form(self, check: Callable[[int, int], None] | None = None) -> None:
        raise NotImplementedError  # Job joins the group of a generation

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
            raise GroupClosed(f"joined group {group!r} as member {rank + 1} after it closed with {size} members")
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
            except GroupClosed:
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
            raise groups_missing(c.num_groups, error) from None
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
                raise groups_missing(c.num_groups, error) from None
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
