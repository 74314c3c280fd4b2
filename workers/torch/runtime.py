"""The process's membership in a job: nd.init(), nd.rank(), nd.size() and nd.shutdown().

Settings come from the environment that `nanodist run`, `nanodist up` and the
compose and stack files set (NANODIST_PS, NANODIST_RUN_ID, ...). A script
started without them runs alone: size 1, no services, and every call works.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Protocol, runtime_checkable

import nanodist.torch.departures as departures
from nanodist.client import NanodistError
from nanodist.workers.config import JobConfig
from nanodist.workers.job import Job, JobFinished
from nanodist.workers.rank_output import prefix_lines
from nanodist.workers.settings import from_environment

_job: Job | None = None
_solo = False
_failed = False
_last_rank = 0  # this process's rank in the job, kept after shutdown() for the lines printed later


class Synchronizable(Protocol):
    def in_flight(self) -> bool: ...

    def synchronize(self) -> None: ...


@runtime_checkable
class Averaging(Synchronizable, Protocol):
    """A DistributedOptimizer or DistributedDataParallel: it averages gradients step by step."""

    def step_joined(self) -> int: ...

    def steps_taken(self) -> int: ...

    def made(self) -> int: ...


_optimizers: weakref.WeakSet[Synchronizable] = weakref.WeakSet()
_closers: list[Callable[[], None]] = []  # run by shutdown() before the job closes


def register(optimizer: Synchronizable) -> None:
    """Track a DistributedOptimizer so that nd.synchronize() and shutdown() reach it."""
    _optimizers.add(optimizer)


def on_shutdown(close: Callable[[], None]) -> None:
    """Run `close` at shutdown(), before the job's clients and group close."""
    _closers.append(close)


def exchanges_without_join() -> bool:
    """Whether something registered exchanges data every step that nd.join cannot stand in for (table rows)."""
    return any(not isinstance(o, Averaging) for o in list(_optimizers))


def distributed_optimizers() -> list[Averaging]:
    """The DistributedOptimizers that exchange gradients, in the order they were made (the same on every rank)."""
    averaging = [o for o in list(_optimizers) if isinstance(o, Averaging) and o.made() >= 0]
    return sorted(averaging, key=lambda o: o.made())


def synchronize() -> None:
    """Wait for the communication in flight of every DistributedOptimizer."""
    for optimizer in list(_optimizers):
        if optimizer.in_flight():  # between steps there is nothing to wait for, and no step to start
            optimizer.synchronize()


def adopt_generation() -> None:
    """Elastic: every DistributedOptimizer drops the step in flight and takes the job's new group."""
    for optimizer in list(_optimizers):
        synchronizer = getattr(optimizer, "_nanodist", None)
        if synchronizer is not None:
            synchronizer.adopt_generation()


def init() -> None:
    """Join the job described by the environment (idempotent)."""
    global _job, _solo
    if _job is not None or _solo:
        return
    if not os.environ.get("NANODIST_RUN_ID"):
        _solo = True  # started as a plain script: a job of one, no services
    else:
        try:
            _job = Job(from_environment(JobConfig))
        except JobFinished as done:
            print(f"nanodist: {done}; nothing to do", flush=True)
            raise SystemExit(0) from None
        prefix_lines(_current_rank)
        sys.excepthook = _report_failure(sys.excepthook)
    atexit.register(shutdown)


def _current_rank() -> int:
    """The job rank now (an elastic job's changes with its generations)."""
    global _last_rank
    if _job is not None:
        _last_rank = _job.rank
    return _last_rank


def _report_failure(previous: Callable[..., None]) -> Callable[..., None]:
    """On an uncaught exception: name this rank (the launcher looks for the line), break the job's
    barrier so that every other worker stops at once naming the cause, and bring down an MPI group."""

    def hook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        global _failed
        _failed = True  # it leaves because it failed: shutdown() must not report a departure
        previous(kind, error, trace)
        if _job is not None:
            print(f"nanodist: rank {_job.rank} failed: {kind.__name__}: {error}", file=sys.stderr, flush=True)
            _job.abort(f"rank {_job.rank} failed: {kind.__name__}: {error}")
            _job.comm.abort()

    return hook


def job() -> Job | None:
    """The joined job, or None when running alone."""
    if _job is None and not _solo:
        raise RuntimeError("nanodist.torch is not initialised: call nd.init() first")
    return _job


def rank() -> int:
    j = job()
    return 0 if j is None else j.rank


def size() -> int:
    j = job()
    return 1 if j is None else j.world


def group_rank() -> int:
    """The rank inside this worker's group (MPI or TCP)."""
    j = job()
    return 0 if j is None else j.comm.rank


def group_size() -> int:
    j = job()
    return 1 if j is None else j.comm.size


def local_rank() -> int:
    """The rank among the workers on this machine (NANODIST_LOCAL_RANK, else mpiexec's, else the group rank)."""
    for name in ("NANODIST_LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return group_rank()


def shutdown() -> None:
    """Leave the job: close the clients and the group (also run at interpreter exit)."""
    global _job, _solo
    optimizers = distributed_optimizers()
    if _job is not None and optimizers and not _job.config.elastic and not _failed:
        with contextlib.suppress(NanodistError):  # the services may be gone already (a job torn down)
            departures.announce(_job, optimizers[0].steps_taken())
    for optimizer in list(_optimizers):
        closer = getattr(optimizer, "_nanodist", None)
        if closer is not None:
            closer.close()
    _optimizers.clear()
    while _closers:
        _closers.pop()()
    if _job is not None:
        _job.close()
    _job, _solo = None, False


__all__ = ["group_rank", "group_size", "init", "job", "local_rank", "rank", "shutdown", "size"]
