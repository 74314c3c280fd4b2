"""from_env(): the same training code runs under mpiexec, a TCP group, or alone."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

from nanodist.settings import env_optional
from nanodist.workers.comm.base import CommError, Communicator, SingleProcess
from nanodist.workers.comm.mesh import DEFAULT_TIMEOUT

# Importing mpi.py is cheap: it imports mpi4py (which initialises MPI) only when an MPICommunicator is built.
from nanodist.workers.comm.mpi import MPICommunicator
from nanodist.workers.comm.rendezvous import RendezvousStore, via_peers, via_store

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_RANK")

T = TypeVar("T", str, int, float)


def detect_backend() -> str:
    if any(name in os.environ for name in _MPI_ENV):
        return "mpi"
    if "NANODIST_WORLD_SIZE" in os.environ or "NANODIST_PEERS" in os.environ:
        return "tcp"
    return "single"


def from_env(
    backend: str | None = None,
    *,
    store: RendezvousStore | None = None,
    world_size: int | None = None,
    rank: int | None = None,
    group: str | None = None,
    peers: Sequence[str] | str | None = None,
    host: str | None = None,
    timeout: float | None = None,
) -> Communicator:
    """Build a communicator from arguments, falling back to NANODIST_* variables.

    backend: "mpi", "tcp", "single", or None for NANODIST_BACKEND, else detected
    (mpiexec's variables mean MPI, NANODIST_WORLD_SIZE or NANODIST_PEERS mean TCP,
    otherwise a group of one). The other arguments are for TCP only:
      store       where ranks meet (a nanodist.client.KVStore on the lock service, say)
      world_size  NANODIST_WORLD_SIZE; ranks to wait for in the store
      rank        NANODIST_RANK; without it a rank comes from the store's counter
      group       NANODIST_GROUP (default "nanodist"); unique per job
      peers       NANODIST_PEERS, "host:port,host:port,..."; replaces the store
      host        NANODIST_COMM_HOST (default 127.0.0.1); the address to listen on
      timeout     NANODIST_COMM_TIMEOUT (default 60 s); for the rendezvous and every collective
    """
    backend = backend or env_optional("backend") or detect_backend()
    if backend == "single":
        return SingleProcess()
    if backend == "mpi":
        return MPICommunicator()
    if backend != "tcp":
        raise CommError(f"unknown backend {backend!r}; choose mpi, tcp or single")

    timeout = timeout if timeout is not None else (_env("comm_timeout", float) or DEFAULT_TIMEOUT)
    rank = rank if rank is not None else _env("rank", int)
    group = group or _env("group", str) or "nanodist"
    peers = peers or _env("peers", str)
    if peers:
        if rank is None:
            raise CommError("a static peer list needs the rank (rank= or NANODIST_RANK)")
        peer_list = peers.split(",") if isinstance(peers, str) else list(peers)
        return via_peers(peer_list, rank, group=group, timeout=timeout)
    world_size = world_size if world_size is not None else _env("world_size", int)
    if world_size is None:
        raise CommError(
            "the tcp backend needs the group size (world_size= or NANODIST_WORLD_SIZE), "
            "or a static peer list (peers= or NANODIST_PEERS)"
        )
    if store is None:
        raise CommError(
            "the tcp backend needs store= to rendezvous (for example a nanodist.client.KVStore "
            "on the lock service), or a static peer list (peers= or NANODIST_PEERS)"
        )
    host = host or _env("comm_host", str) or "127.0.0.1"
    return via_store(store, group, world_size, rank, host=host, timeout=timeout)


def _env(name: str, kind: type[T]) -> T | None:
    """NANODIST_<NAME> converted to `kind`; None when unset or empty."""
    raw = env_optional(name)
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise CommError(f"NANODIST_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None
