"""How TCP ranks find each other: through a key-value store (the lock service's), or a static list."""

from __future__ import annotations

import socket
from typing import Protocol

from nanodist.workers.comm.base import CommError
from nanodist.workers.comm.mesh import DEFAULT_TIMEOUT, listen
from nanodist.workers.comm.tcp import CHUNK_BYTES, TCPCommunicator


class RendezvousStore(Protocol):
    """The part of a torch.distributed-style Store that a rendezvous needs.

    nanodist.client.KVStore is one. Failures are reported with builtin exception
    types, so that this package needs no client: a wait that times out raises
    TimeoutError, get of a missing key raises LookupError, and a store that
    cannot be reached raises ConnectionError.
    """

    def set(self, key: str, value: str | bytes, /) -> None: ...

    def get(self, key: str, /) -> bytes: ...

    def add(self, key: str, amount: int, /) -> int:
        """Add to a counter (absent = 0) atomically; the new value."""

    def wait(self, keys: list[str], timeout: float, /) -> None:
        """Return once every key exists; TimeoutError after `timeout` seconds."""


def advertised_host(bind_host: str) -> str:
    """The address peers should dial: the bind address, or this host's address when bound to all."""
    if bind_host not in ("0.0.0.0", ""):
        return bind_host
    return socket.gethostbyname(socket.gethostname())


def via_store(
    store: RendezvousStore,
    group: str,
    size: int,
    rank: int | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float = DEFAULT_TIMEOUT,
    chunk_bytes: int = CHUNK_BYTES,
) -> TCPCommunicator:
    """Join `group` of `size` ranks. Without `rank`, take the next one from an atomic counter.

    Each rank publishes host:port under "<group>/addr/<rank>" and waits for the
    others; a rank that never shows up is named in the CommError. The store
    stays open: it belongs to the caller.
    """
    if size < 1:
        raise CommError(f"group {group!r}: size must be >= 1, got {size}")
    listener: socket.socket | None = None
    try:
        if rank is None:
            rank = store.add(f"{group}/next-rank", 1) - 1
            if rank >= size:
                raise CommError(f"group {group!r} already has its {size} ranks; use a new group name per job")
        if not 0 <= rank < size:
            raise CommError(f"rank {rank} is outside [0, {size}) for group {group!r}")
        listener = listen(host)
        store.set(f"{group}/addr/{rank}", f"{advertised_host(host)}:{listener.getsockname()[1]}")
        addresses = _addresses(store, group, size, timeout)
    except Exception as error:
        if listener is not None:
            listener.close()
        if isinstance(error, CommError):
            raise
        # Any store failure (unreachable, refused, a bug in the store) ends the rendezvous the same way.
        raise CommError(f"rendezvous of group {group!r} failed: {type(error).__name__}: {error}") from None
    return TCPCommunicator.connect(rank, addresses, listener, group=group, timeout=timeout, chunk_bytes=chunk_bytes)


def _addresses(store: RendezvousStore, group: str, size: int, timeout: float) -> list[str]:
    """Every rank's host:port, once all have published; CommError naming the ranks still missing."""
    keys = [f"{group}/addr/{r}" for r in range(size)]
    try:
        store.wait(keys, timeout)
    except TimeoutError:
        missing = [r for r in range(size) if not _exists(store, keys[r])]
        raise CommError(f"group {group!r}: ranks {missing} did not join within {timeout:g}s") from None
    return [store.get(key).decode() for key in keys]


def _exists(store: RendezvousStore, key: str) -> bool:
    try:
        store.get(key)
        return True
    except LookupError:
        return False


def via_peers(
    peers: list[str],
    rank: int,
    *,
    group: str = "nanodist",
    timeout: float = DEFAULT_TIMEOUT,
    chunk_bytes: int = CHUNK_BYTES,
) -> TCPCommunicator:
    """Join a group whose addresses are known in advance: rank r listens on peers[r]."""
    if not 0 <= rank < len(peers):
        raise CommError(f"rank {rank} is outside [0, {len(peers)}) for peers {peers}")
    host, port = peers[rank].rsplit(":", 1)
    listener = listen(host if host != "localhost" else "127.0.0.1", int(port))
    return TCPCommunicator.connect(rank, peers, listener, group=group, timeout=timeout, chunk_bytes=chunk_bytes)
