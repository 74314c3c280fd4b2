"""The TCP rendezvous works with any store that keeps the RendezvousStore contract (builtin exceptions)."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from nanodist.workers.comm import CommError, ReduceOp, RendezvousStore, rendezvous
from nanodist.workers.comm.rendezvous import via_store


class MemoryStore:
    """An in-process store: a missing key is a KeyError (a LookupError), a timed-out wait a TimeoutError."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.changed = threading.Condition()

    def set(self, key: str, value: str | bytes) -> None:
        with self.changed:
            self.values[key] = value.encode() if isinstance(value, str) else value
            self.changed.notify_all()

    def get(self, key: str) -> bytes:
        with self.changed:
            return self.values[key]

    def add(self, key: str, amount: int) -> int:
        with self.changed:
            total = int(self.values.get(key, b"0")) + amount
            self.values[key] = str(total).encode()
            return total

    def wait(self, keys: list[str], timeout: float) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: all(k in self.values for k in keys), timeout):
                raise TimeoutError(f"keys missing after {timeout}s")


class DownStore(MemoryStore):
    """A store whose service is unreachable once the rank is taken."""

    def set(self, key: str, value: str | bytes) -> None:
        raise ConnectionError("lock service at 10.0.0.9:50071 unreachable")


def test_ranks_from_the_counter_meet_and_allreduce() -> None:
    store: RendezvousStore = MemoryStore()

    def rank_body(_: int) -> tuple[int, list[float]]:
        with via_store(store, "job-1", 3, timeout=10) as comm:
            array = np.full(5, comm.rank + 1.0)
            comm.allreduce(array, ReduceOp.SUM)
            return comm.rank, array.tolist()

    with ThreadPoolExecutor(3) as pool:
        results = sorted(pool.map(rank_body, range(3)))
    assert [rank for rank, _ in results] == [0, 1, 2]
    assert all(values == [6.0] * 5 for _, values in results)


def test_a_timed_out_wait_names_the_ranks_that_never_joined() -> None:
    with pytest.raises(CommError, match=r"group 'job-2': ranks \[1, 2\] did not join within 0.2s"):
        via_store(MemoryStore(), "job-2", 3, timeout=0.2)


def test_a_full_group_refuses_another_rank() -> None:
    store = MemoryStore()
    store.add("job-3/next-rank", 2)
    with pytest.raises(CommError, match="group 'job-3' already has its 2 ranks"):
        via_store(store, "job-3", 2, timeout=1)


def test_a_store_failure_is_a_comm_error_naming_the_group_and_the_listener_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[socket.socket] = []
    real_listen = rendezvous.listen

    def recording_listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
        opened.append(real_listen(host, port))
        return opened[-1]

    monkeypatch.setattr(rendezvous, "listen", recording_listen)
    with pytest.raises(
        CommError, match=r"rendezvous of group 'job-4' failed: ConnectionError: lock service at 10.0.0.9:50071"
    ):
        via_store(DownStore(), "job-4", 2, timeout=1)
    assert len(opened) == 1 and opened[0].fileno() == -1, "the listening socket must not leak"
