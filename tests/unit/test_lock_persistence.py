"""The lock service's state on disk: log, snapshots, replay, and the request ids that make retries safe."""

import asyncio
import os

import pytest

from nanodist.services.common.errors import ServiceError
from nanodist.services.lock import snapshot
from nanodist.services.lock.kv import KeyValueStore
from nanodist.services.lock.locks import FencingTokens, LockTable
from nanodist.services.lock.persistence import Persistence
from nanodist.v1 import lock_pb2 as pb


def fresh(directory: str, max_log_bytes: int = 1 << 20) -> Persistence:
    return Persistence(directory, KeyValueStore(1 << 20), LockTable(FencingTokens(directory)), max_log_bytes)


def run_service(directory: str, work, max_log_bytes: int = 1 << 20, close: bool = False) -> Persistence:
    """Restore from `directory`, run `work(persistence)` on the loop, and stop as kill -9 would (or close)."""

    async def main() -> Persistence:
        persistence = fresh(directory, max_log_bytes)
        persistence.start()
        persistence.table.leases.start()
        await work(persistence)
        await persistence.synced()
        while persistence._tasks:  # snapshots under way finish, as they would in a server that lives on
            await asyncio.sleep(0.01)
        if close:
            await persistence.close()
        return persistence

    return asyncio.run(main())


def restored(directory: str) -> Persistence:
    async def nothing(persistence: Persistence) -> None:
        pass

    return run_service(directory, nothing)


def test_a_retried_add_or_swap_is_answered_not_applied_again():
    store = KeyValueStore(1024)
    assert store.add("c", 5, "r1") == 5
    assert store.add("c", 5, "r1") == 5 and store.values["c"] == b"5"
    assert store.add("c", 1) == 6
    assert store.compare_and_swap("k", b"", True, b"v", "r2") == (True, b"v")
    store.set("k", b"changed")
    assert store.compare_and_swap("k", b"", True, b"v", "r2") == (True, b"v")  # the first call's answer
    assert store.values["k"] == b"changed"
    with pytest.raises(ServiceError, match="request_id: 'r1' was already used by an Add of key 'c'"):
        store.add("other", 1, "r1")
    with pytest.raises(ServiceError, match="was already used by an Add"):
        store.compare_and_swap("c", b"", True, b"v", "r1")


def test_every_change_comes_back_after_a_crash(tmp_path):
    directory = str(tmp_path)

    async def work(p: Persistence) -> None:
        p.store.set("a", b"1")
        p.store.set("gone", b"x")
        p.store.delete("gone")
        p.store.compare_and_swap("owner", b"", True, b"me", "swap-1")
        for _ in range(3):
            p.store.add("rank", 1)
        p.store.add("rank", 10, "add-1")
        held = p.table.try_acquire("model", "worker", pb.EXCLUSIVE, 5000, "acq-1")
        released = p.table.try_acquire("other", "worker", pb.EXCLUSIVE, 5000)
        assert held is not None and released is not None
        p.table.release("other", released.lease.lease_id)

    before = run_service(directory, work)
    after = restored(directory)
    assert after.store.values == before.store.values == {"a": b"1", "owner": b"me", "rank": b"13"}
    assert after.store.add("rank", 10, "add-1") == 13  # still remembered
    (holding,) = after.table.holdings.values()
    (original,) = before.table.holdings.values()
    assert (holding.lease.lease_id, holding.token, holding.lock) == (original.lease.lease_id, original.token, "model")
    assert after.table.granted_before("model", "acq-1") is holding
    assert after.table.tokens.next() > holding.token


def test_the_log_is_bounded_by_snapshots_and_a_damaged_snapshot_falls_back(tmp_path, caplog):
    directory = str(tmp_path)

    async def work(p: Persistence) -> None:
        for i in range(400):
            p.store.add("counter", 1, f"id-{i}")
            p.store.set(f"key-{i % 7}", str(i).encode())
            await asyncio.sleep(0)  # let snapshots run as they would between calls
            while p._tasks:  # and finish before the next change: how fast a thread writes is not the bound's
                await asyncio.sleep(0.001)

    run_service(directory, work, max_log_bytes=4096)
    taken = snapshot.lsns(directory)
    assert len(taken) == 2, taken
    wal_bytes = sum(
        os.path.getsize(os.path.join(directory, "wal", n)) for n in os.listdir(os.path.join(directory, "wal"))
    )
    assert wal_bytes < 4 * 4096
    assert restored(directory).store.values["counter"] == b"400"

    newest = snapshot.path(directory, taken[-1])
    data = bytearray(open(newest, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(newest, "wb").write(bytes(data))
    fallback = restored(directory)
    assert f"{newest} is damaged" in caplog.text
    assert fallback.store.values["counter"] == b"400" and fallback.store.add("counter", 1, "id-399") == 400


def test_a_shutdown_snapshots_and_a_torn_tail_is_dropped(tmp_path):
    directory = str(tmp_path)

    async def work(p: Persistence) -> None:
        p.store.set("k", b"v")

    run_service(directory, work, close=True)
    assert len(snapshot.lsns(directory)) == 1
    (segment,) = [
        n for n in os.listdir(os.path.join(directory, "wal")) if os.path.getsize(os.path.join(directory, "wal", n)) == 0
    ]
    with open(os.path.join(directory, "wal", segment), "ab") as f:
        f.write(b"\x01\x20\x00\x00")  # a record cut short by the crash
    assert restored(directory).store.values == {"k": b"v"}


def test_a_state_dir_with_no_snapshot_and_a_pruned_log_is_refused(tmp_path):
    directory = str(tmp_path)

    async def work(p: Persistence) -> None:
        for i in range(200):
            p.store.set("k", str(i).encode())
            await asyncio.sleep(0)

    run_service(directory, work, max_log_bytes=1024)
    for lsn in snapshot.lsns(directory):
        os.remove(snapshot.path(directory, lsn))
    with pytest.raises(ValueError, match="no intact snapshot, and the log before LSN"):
        restored(directory)
