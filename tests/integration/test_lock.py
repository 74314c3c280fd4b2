import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from nanodist.client import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KVStore,
    LockClient,
    NotFound,
)
from nanodist.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import etcd_url, health_status
from tests.integration.test_barrier import in_thread, worker


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


@pytest.fixture(params=["embedded", "etcd"])
def lock_server(request, start_server):
    """Starts `nanodist serve lock` on each store (etcd: three members): every guarantee of lock.proto
    holds on both."""

    def start(*args: str):
        if request.param == "etcd":
            return start_server("lock", "--store", etcd_url(request.getfixturevalue("etcd_cluster")), *args)
        return start_server("lock", *args)

    return start


def waiters_of(client: LockClient, name: str) -> list[str]:
    return list(client.status(name)[0].waiters)


def test_a_killed_holder_loses_the_lock_after_its_ttl(lock_server):
    server = lock_server()
    ttl = 2.0  # etcd's shortest lease (3.4, default election timeout)
    doomed = worker("hold-lock", server.address, "model", str(ttl))
    doomed_token = int(doomed.stdout.readline())
    client = LockClient(server.address, "next")
    thread, outcome = in_thread(client.acquire, "model", ttl=5, timeout=30)
    wait_until(lambda: waiters_of(client, "model") == ["next"])
    time.sleep(ttl)  # the holder keeps its lease alive while it lives
    assert waiters_of(client, "model") == ["next"]
    doomed.kill()
    killed_at = time.monotonic()
    doomed.wait()
    thread.join(timeout=30)
    held = outcome["result"]
    assert held.fencing_token > doomed_token
    # The lease passed it on, well before the wait's own 30 s: how soon (its TTL, and on etcd the leader's
    # expiry sweep and a revoke through the quorum) depends on the machine's load.
    assert outcome["at"] - killed_at < 15


def test_waiters_are_granted_in_fifo_order(lock_server):
    server = lock_server()
    holder = LockClient(server.address, "holder")
    held = holder.acquire("fifo")
    order: list[str] = []
    clients = [LockClient(server.address, f"w{i}") for i in range(5)]

    def take(client: LockClient) -> None:
        got = client.acquire("fifo", timeout=30)
        order.append(client.owner)
        client.release(got)

    threads = []
    for i, client in enumerate(clients):
        threads.append(in_thread(take, client)[0])
        wait_until(lambda i=i: len(waiters_of(holder, "fifo")) == i + 1)
    holder.release(held)
    for thread in threads:
        thread.join(timeout=10)
    assert order == [f"w{i}" for i in range(5)]


def test_fencing_tokens_keep_increasing_across_a_restart(start_server, tmp_path):
    state = str(tmp_path / "lock-state")
    server = start_server("lock", "--state-dir", state)
    client = LockClient(server.address)
    tokens = []
    for _ in range(3):
        held = client.acquire("t")
        tokens.append(held.fencing_token)
        client.release(held)
    client.close()
    server.stop()
    restarted = start_server("lock", "--state-dir", state, port=server.port)
    with LockClient(restarted.address) as again:
        held = again.acquire("t")
    assert tokens == sorted(set(tokens)) and held.fencing_token > tokens[-1]


def test_readers_share_writers_exclude_and_a_queued_writer_is_not_starved(lock_server):
    server = lock_server()
    r1, r2, w = (LockClient(server.address, o) for o in ("r1", "r2", "w"))
    first = r1.acquire("rw", shared=True)
    second = r2.acquire("rw", shared=True, timeout=1)  # readers share
    assert w.try_acquire("rw") is None
    r2.release(second)
    thread, outcome = in_thread(w.acquire, "rw", timeout=30)
    wait_until(lambda: waiters_of(r1, "rw") == ["w"])
    assert r2.try_acquire("rw", shared=True) is None, "a reader must not overtake a queued writer"
    r1.release(first)
    thread.join(timeout=5)
    writer = outcome["result"]
    assert r2.try_acquire("rw", shared=True) is None
    w.release(writer)
    assert r2.try_acquire("rw", shared=True) is not None


def test_lock_context_manager_keeps_the_lease_alive(lock_server):
    server = lock_server()
    client = LockClient(server.address)
    ttl = 0.2
    with client.lock("long", ttl=ttl) as held:
        time.sleep(4 * ttl)  # outlives the lease unless renewals keep it
        assert not held.lost
        assert client.try_acquire("long") is None
    assert client.try_acquire("long") is not None


def test_acquire_timeout_names_the_holder(lock_server):
    server = lock_server()
    LockClient(server.address, "alice").acquire("busy", ttl=30)
    with pytest.raises(DeadlineExceeded, match="held by alice"):
        LockClient(server.address, "bob").acquire("busy", timeout=0.3)


def test_a_repeated_release_is_answered_as_the_first_but_not_for_another_lock(lock_server):
    """A Release retried after its answer was lost (a replica gone, a timeout) must not read as a lapse."""
    server = lock_server()
    with grpc.insecure_channel(server.address) as channel:
        stub = lock_pb2_grpc.LockStub(channel)
        granted = stub.Acquire(lock_pb2.AcquireRequest(name="r", owner="me", ttl_ms=30_000), timeout=10)
        release = lock_pb2.ReleaseRequest(name="r", lease_id=granted.lease_id)
        stub.Release(release, timeout=10)
        stub.Release(release, timeout=10)  # the repeat: answered, not FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as refused:
            stub.Release(lock_pb2.ReleaseRequest(name="other", lease_id=granted.lease_id), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_releasing_with_the_wrong_lease_is_a_failed_precondition(lock_server):
    server = lock_server()
    client = LockClient(server.address)
    held = client.acquire("x")
    held.lease_id = "not-mine"
    with pytest.raises(FailedPrecondition, match="does not hold lock 'x'"):
        client.release(held)


def test_compare_and_swap_race_between_processes_has_one_winner(lock_server):
    server = lock_server()
    procs = [worker("cas", server.address, "leader", f"p{i}") for i in range(6)]
    with KVStore(server.address) as store:
        store.set("go", "1")
        outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert sorted(outputs) == ["lost"] * 5 + ["won"]
        winner = store.get("leader").decode()
    assert outputs[int(winner[1:])] == "won"


def test_add_from_many_processes_is_exact(lock_server):
    server = lock_server()
    procs = [worker("add", server.address, "counter", "150") for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 4
    with KVStore(server.address) as store:
        assert store.add("counter", 0) == 600
        assert store.get("counter") == b"600"


def test_wait_for_keys_with_a_timeout(lock_server):
    server = lock_server()
    store = KVStore(server.address)
    store.set("a", "1")
    with pytest.raises(DeadlineExceeded, match="keys still missing: b"):
        store.wait(["a", "b"], timeout=0.3)
    thread, outcome = in_thread(store.wait, ["a", "b"], timeout=10)
    store.set("b", "2")
    thread.join(timeout=5)
    assert "error" not in outcome


def test_kv_semantics(lock_server):
    server = lock_server()
    with KVStore(server.address) as store:
        with pytest.raises(NotFound, match="'k' does not exist"):
            store.get("k")
        assert store.compare_set("k", None, "v1") == (True, b"v1")
        assert store.compare_set("k", "nope", "v2") == (False, b"v1")
        assert store.compare_set("k", "v1", "v2") == (True, b"v2")
        with pytest.raises(FailedPrecondition, match="not a decimal integer"):
            store.add("k", 1)
        assert store.delete_key("k") and not store.delete_key("k")


@pytest.mark.parametrize(
    ("method", "request_message", "message"),
    [
        (
            "Acquire",
            lock_pb2.AcquireRequest(name="", owner="o", ttl_ms=1000),
            "name: must not be empty",
        ),
        (
            "Acquire",
            lock_pb2.AcquireRequest(name="x" * 300, owner="o", ttl_ms=1000),
            "name: 300 characters",
        ),
        (
            "Acquire",
            lock_pb2.AcquireRequest(name="x", owner="o", ttl_ms=-5),
            "ttl_ms: -5 is outside",
        ),
        (
            "TryAcquire",
            lock_pb2.AcquireRequest(name="x", owner="o", ttl_ms=1000, mode=7),
            "mode: unknown",
        ),
    ],
)
def test_bad_lock_requests_are_invalid_and_the_server_stays_healthy(lock_server, method, request_message, message):
    server = lock_server()
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            getattr(lock_pb2_grpc.LockStub(channel), method)(request_message, timeout=5)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING


def test_an_oversized_value_is_refused_and_the_old_value_kept(lock_server):
    server = lock_server("--max-value-bytes", "1024")
    with KVStore(server.address) as store:
        store.set("k", "small")
        with pytest.raises(InvalidArgument, match="value: 1025 bytes, at most 1024"):
            store.set("k", b"x" * 1025)
        assert store.get("k") == b"small"
