"""How TCP ranks find each other: through the lock service's key-value store, or a static list."""

from __future__ import annotations

import socket

from nanodist.client import DeadlineExceeded, KVStore, NanodistError
from nanodist.workers.comm.base import CommError
from nanodist.workers.comm.tcp import CHUNK_BYTES, DEFAULT_TIMEOUT, TCPCommunicator, listen


def advertised_host(bind_host: str) -> str:
    """The address peers should dial: the bind address, or this host's address when bound to all."""
    if bind_host not in ("0.0.0.0", ""):
        return bind_host
    return socket.gethostbyname(socket.gethostname())


def via_kv(
    kv_address: str,
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
    others; a rank that never shows up is named in the CommError.
    """
    if size < 1:
        raise CommError(f"group {group!r}: size must be >= 1, got {size}")
    try:
        with KVStore(kv_address, timeout=timeout) as store:
            if rank is None:
                rank = store.add(f"{group}/next-rank", 1) - 1
                if rank >= size:
                    raise CommError(f"group {group!r} already has its {size} ranks; use a new group name per job")
            if not 0 <= rank < size:
                raise CommError(f"rank {rank} is outside [0, {size}) for group {group!r}")
            listener = listen(host)
            address = f"{advertised_host(host)}:{listener.getsockname()[1]}"
            store.set(f"{group}/addr/{rank}", address)
            keys = [f"{group}/addr/{r}" for r in range(size)]
            try:
                store.wait(keys, timeout=timeout)
            except DeadlineExceeded:
                missing = [r for r in range(size) if not _exists(store, keys[r])]
                listener.close()
                raise CommError(f"group {group!r}: ranks {missing} did not join within {timeout:g}s") from None
            addresses = [store.get(key).decode() for key in keys]
    except NanodistError as error:
        raise CommError(f"rendezvous of group {group!r} through {kv_address} failed: {error}") from None
    return TCPCommunicator.connect(rank, addresses, listener, group=group, timeout=timeout, chunk_bytes=chunk_bytes)


def _exists(store: KVStore, key: str) -> bool:
    try:
        store.get(key)
        return True
    except NanodistError:
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
