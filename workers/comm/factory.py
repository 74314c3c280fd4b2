"""Communicator.from_env(): the same training code runs under mpiexec, a TCP group, or alone."""

from __future__ import annotations

import os

from nanodist.workers.comm.base import CommError, Communicator, SingleProcess
from nanodist.workers.comm.tcp import DEFAULT_TIMEOUT

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_RANK")


def detect_backend() -> str:
    if any(name in os.environ for name in _MPI_ENV):
        return "mpi"
    if "NANODIST_WORLD_SIZE" in os.environ or "NANODIST_PEERS" in os.environ:
        return "tcp"
    return "single"


def from_env(backend: str | None = None, **options: object) -> Communicator:
    """Build a communicator from arguments, falling back to NANODIST_* variables.

    backend: "mpi", "tcp", "single", or None to detect (mpiexec's variables mean MPI,
    NANODIST_WORLD_SIZE or NANODIST_PEERS mean TCP, otherwise a group of one).
    TCP options: world_size, rank, group, lock_address (rendezvous), peers
    (a static list instead), host (bind address), timeout.
    """
    env = os.environ.get
    backend = backend or env("NANODIST_BACKEND") or detect_backend()
    if backend == "single":
        return SingleProcess()
    if backend == "mpi":
        from nanodist.workers.comm.mpi import MPICommunicator

        return MPICommunicator()
    if backend != "tcp":
        raise CommError(f"unknown backend {backend!r}; choose mpi, tcp or single")

    from nanodist.workers.comm import rendezvous

    timeout = float(options.get("timeout") or env("NANODIST_COMM_TIMEOUT", DEFAULT_TIMEOUT))  # type: ignore[arg-type]
    rank_option = options.get("rank", env("NANODIST_RANK"))
    rank = None if rank_option in (None, "") else int(rank_option)  # type: ignore[arg-type]
    group = str(options.get("group") or env("NANODIST_GROUP", "nanodist"))
    peers = options.get("peers") or env("NANODIST_PEERS")
    if peers:
        peer_list = peers.split(",") if isinstance(peers, str) else list(peers)  # type: ignore[arg-type]
        if rank is None:
            raise CommError("a static peer list needs the rank (NANODIST_RANK or rank=)")
        return rendezvous.via_peers(peer_list, rank, group=group, timeout=timeout)
    size_option = options.get("world_size") or env("NANODIST_WORLD_SIZE")
    lock_address = options.get("lock_address") or env("NANODIST_LOCK_ADDRESS")
    if not size_option or not lock_address:
        raise CommError(
            "the tcp backend needs world_size and lock_address (NANODIST_WORLD_SIZE, "
            "NANODIST_LOCK_ADDRESS), or a static peer list (NANODIST_PEERS)"
        )
    host = str(options.get("host") or env("NANODIST_COMM_HOST", "127.0.0.1"))
    return rendezvous.via_kv(
        str(lock_address),
        group,
        int(size_option),
        rank,
        host=host,  # type: ignore[arg-type]
        timeout=timeout,
    )
