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
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nanodist.client import (
    BarrierClient,
    ClientSecurity,
    KVStore,
    Membership,
    NanodistError,
    ParameterServerClient,
    Values,
)
from nanodist.client.health import wait_serving
from nanodist.workers.comm import Communicator, from_env
from nanodist.workers.config import ConfigError, JobConfig
from nanodist.workers.generations import Generations, GroupClosed, JobFinished, groups_missing
from nanodist.workers.membership_watch import CutOff
from nanodist.workers.progress import say

__all__ = ["CutOff", "Job", "JobFinished"]


class Job(Generations):
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
        self._worlds = {}  # the world size of each earlier generation
        self.joined_late = False  # elastic: this worker entered a group already training
        self.kv = KVStore(config.lock, timeout=config.timeout, security=security)
        self._services_ready = False
        self._expected = None  # members the next generation can close with at once
        self._expected_groups = config.num_groups  # groups the next generation can close with at once
        self._group_waiting = False  # elastic: this group is counted in <run>/joining-groups
        self._boundaries = 0  # admit_joiners calls in this generation, all ranks in step
        self.group_ids = []  # the groups of this generation, in the order of their ranks
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
            except GroupClosed as closed:  # elastic: the whole group came after the generation closed
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
            session_ttl=c.session_ttl,
            barriers=[self.barrier_name],
            timeout=c.timeout,
            security=self.security,
        )
        self.comm.watch(self.membership_problem)
        self.comm.name_ranks(self.rank - self.comm.rank)
        if c.elastic:
            if self.rank == 0:
                self.kv.set(f"{c.run_id}/generation", str(self.generation))
            if self.comm.rank == 0:
                self.kv.set(self._backend_key(c.group_id), c.backend)  # see regroup_after_loss
            self._record_members()

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
            if rank is None:  # a fixed size: the rank came from the store's counter, as with --group-size 0
                say(f"[{self._group}] member {comm.rank} of {comm.size}")
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

    def _groups(self) -> tuple[list[int], list[int]]:
        """The groups of this generation and their sizes, in the order of their ranks.

        Every group leader publishes its size. A fixed job waits for all of --num-groups; in an elastic
        one the leaders register, and the first closes the generation (see _close_generation). Raises
        GroupClosed, on every rank of a group, when the group came after its generation closed.
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
                raise GroupClosed(f"group {c.group_id} came after generation {self.generation} closed")
            ids = [int(g) for g in self.kv.get(f"{sizes}/list").decode().split(",")]
        keys = [f"{sizes}/{g}" for g in ids]
        try:
            self.kv.wait(keys, timeout=c.timeout)
        except NanodistError as error:
            raise groups_missing(c.num_groups, error) from None
        return ids, [int(self.kv.get(k)) for k in keys]

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

    def close(self) -> None:
        if self._collectives is not None:
            self._collectives.shutdown(wait=True)
        self.barrier.close()
        self.kv.close()
        for client in (self.ps, self._reader):
            if client is not None:
                client.close()
        self.comm.close()
