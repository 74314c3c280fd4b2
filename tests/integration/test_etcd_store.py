"""The lock service on etcd (--store etcd://...): replicas that keep no state of their own and serve any
client, whichever replica a call reaches. test_lock.py runs the API's guarantees on both stores."""

import signal
import subprocess
import threading
import time

import grpc
import pytest

from nanodist.client import KVStore, LockClient
from nanodist.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import nanodist_command
from tests.history import History, Hold, check_linearizable, check_locks
from tests.integration.test_barrier import in_thread
from tests.integration.test_lock import wait_until


def kill(server) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()


def test_a_retried_add_swap_or_acquire_is_answered_once_by_another_replica(start_server, etcd):
    first_replica, second_replica = (start_server("lock", "--store", etcd.url()) for _ in range(2))
    add = lock_pb2.AddRequest(key="joined", delta=1, request_id="add-1")
    swap = lock_pb2.CompareAndSwapRequest(key="leader", expect_absent=True, desired=b"me", request_id="swap-1")
    acquire = lock_pb2.AcquireRequest(name="model", owner="me", ttl_ms=30_000, request_id="acquire-1")
    with grpc.insecure_channel(first_replica.address) as channel:
        kv, locks = lock_pb2_grpc.KeyValueStub(channel), lock_pb2_grpc.LockStub(channel)
        first = (kv.Add(add, timeout=10), kv.CompareAndSwap(swap, timeout=10), locks.Acquire(acquire, timeout=10))
    kill(first_replica)  # the answers were lost with it: the caller retries on the other replica
    with grpc.insecure_channel(second_replica.address) as channel:
        kv, locks = lock_pb2_grpc.KeyValueStub(channel), lock_pb2_grpc.LockStub(channel)
        again = (kv.Add(add, timeout=10), kv.CompareAndSwap(swap, timeout=10), locks.Acquire(acquire, timeout=10))
        assert again == first
        assert kv.Add(lock_pb2.AddRequest(key="joined", delta=0), timeout=10).value == 1
        (state,) = locks.Status(lock_pb2.LockStatusRequest(name="model"), timeout=10).locks
        assert [h.fencing_token for h in state.holders] == [first[2].fencing_token]
        used = lock_pb2.AddRequest(key="other", delta=1, request_id="swap-1")
        with pytest.raises(grpc.RpcError) as refused:
            kv.Add(used, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "already used by a CompareAndSwap of key 'leader'" in refused.value.details()


@pytest.mark.slow
def test_clients_of_two_replicas_share_one_lock_and_one_counter(start_server, etcd):
    """Clients split over two replicas contend for one lock and add to one counter: checked on their
    recorded calls, no two held the lock at once, every later grant had a larger token, and the
    counter's history is linearizable."""
    replicas = [start_server("lock", "--store", etcd.url()) for _ in range(2)]
    holds: list[Hold] = []
    history = History()
    stop = threading.Event()

    def contend(name: str, address: str) -> None:
        with LockClient(address, name) as client, KVStore(address) as store:
            while not stop.is_set():
                requested = time.monotonic()
                held = client.acquire("resource", ttl=5, timeout=60)
                granted = time.monotonic()
                history.record(name, "add", "count", 1, lambda: store.add("count", 1))  # noqa: B023
                holds.append(Hold(name, "resource", held.fencing_token, False, requested, granted, granted,
                                  time.monotonic()))  # fmt: skip
                client.release(held)

    threads = [in_thread(contend, f"c{i}", replicas[i % 2].address) for i in range(4)]
    wait_until(lambda: len(holds) >= 60, 120)
    stop.set()
    for thread, outcome in threads:
        thread.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
    assert check_locks(holds) == []
    assert check_linearizable(history.operations) == []
    with KVStore(replicas[1].address) as store:
        assert store.add("count", 0) == len(holds)


def test_a_waiter_on_a_killed_replica_leaves_the_queue_within_its_lease(start_server, etcd):
    """The replica serving a waiter renews its lease; when it dies, the lease lapses and the waiter no
    longer stands in the way of the next."""
    serving, other = (start_server("lock", "--store", etcd.url()) for _ in range(2))
    holder = LockClient(other.address, "holder")
    held = holder.acquire("model", ttl=30)
    thread, _ = in_thread(LockClient(serving.address, "doomed").acquire, "model", ttl=2, timeout=60)
    wait_until(lambda: list(holder.status("model")[0].waiters) == ["doomed"])
    kill(serving)
    thread.join(timeout=30)
    wait_until(lambda: list(holder.status("model")[0].waiters) == [], timeout=30)
    holder.release(held)
    assert LockClient(other.address, "next").try_acquire("model") is not None


def test_the_store_flag_is_checked_before_anything_binds(tmp_path):
    for args, message in [
        (["--store", "redis://x:1"], "expected 'embedded' or etcd://HOST:PORT"),
        (["--store", "etcd://host"], "'host' is not HOST:PORT"),
        (["--store", "etcd://127.0.0.1:2379", "--state-dir", str(tmp_path)], "--state-dir: the etcd store"),
    ]:
        done = subprocess.run(nanodist_command("serve", "lock", "--port", "0", *args), capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


@pytest.mark.slow
def test_the_lock_service_rides_through_losing_the_etcd_member_it_talks_to(start_server, etcd_cluster):
    """Three etcd members; the member the replica uses first is killed with kill -9 mid-run. The
    replica moves to the next, the clients' retries land there, a held lock keeps its lease, and
    every acknowledged add is counted once in a linearizable history."""
    store = "etcd://" + ",".join(m.endpoint for m in etcd_cluster) + "/test"
    replica = start_server("lock", "--store", store)
    history = History()
    stop = threading.Event()

    def add(name: str) -> None:
        with KVStore(replica.address) as kv:
            while not stop.is_set():
                history.record(name, "add", "count", 1, lambda: kv.add("count", 1))  # noqa: B023

    holder = LockClient(replica.address, "holder")
    with holder.lock("model", ttl=3) as held:
        adders = [in_thread(add, f"a{i}") for i in range(2)]
        wait_until(lambda: len(history.operations) >= 50, 60)
        etcd_cluster[0].process.kill()
        etcd_cluster[0].process.wait()
        acked = len(history.operations)
        wait_until(lambda: len(history.operations) >= acked + 50, 120)
        assert not held.lost
        assert [h.fencing_token for h in holder.status("model")[0].holders] == [held.fencing_token]
    stop.set()
    for thread, outcome in adders:
        thread.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
    assert check_linearizable(history.operations) == []
    with KVStore(replica.address) as kv:
        assert kv.add("count", 0) == len(history.operations)
