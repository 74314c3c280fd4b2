"""kill -9 of the lock or barrier service, restarted on the same port: what is kept, and clients that ride through."""

import os
import signal
import threading
import time

import grpc
import pytest

from nanodist.client import BarrierClient, KVStore, LockClient, Unavailable
from nanodist.client.retry import NO_RETRY
from nanodist.v1 import lock_pb2, lock_pb2_grpc
from tests.history import History, Hold, check_linearizable, check_locks
from tests.integration.test_barrier import in_thread, wait_for_arrivals
from tests.integration.test_lock import wait_until, waiters_of

WRITERS = 4
DOWNTIME = 1.0  # seconds the service stays dead, as when its container is restarted


def kill(server) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()


@pytest.mark.slow
def test_every_acknowledged_kv_change_survives_kill_9_and_counters_continue(start_server, tmp_path):
    state = tmp_path / "lock-state"
    args = ("--state-dir", str(state), "--max-log-bytes", str(16 << 10))  # snapshots while writes are in flight
    server = start_server("lock", *args)
    ranks: list[int] = []  # every value an acknowledged add of the shared counter returned
    last_set = dict.fromkeys(range(WRITERS), 0)
    last_swap = dict.fromkeys(range(WRITERS), 0)
    failures: list[BaseException] = []
    started = threading.Barrier(WRITERS + 1)

    history = History()  # every call, timed, for the linearizability check

    def writer(index: int) -> None:
        me = f"writer-{index}"
        with KVStore(server.address, retry=NO_RETRY) as store:
            started.wait()
            step = 0
            while True:
                step += 1
                try:
                    ranks.append(history.record(me, "add", "rank", 1, lambda: store.add("rank", 1)))
                    value = str(step)
                    history.record(me, "set", f"set/{index}", value, lambda v=value: store.set(f"set/{index}", v))
                    last_set[index] = step
                    expected = str(step - 1) if step > 1 else None

                    def swap(expected: str | None = expected, value: str = value) -> tuple[bool, str | None]:
                        swapped, now = store.compare_set(f"swap/{index}", expected, value)
                        return swapped, now.decode() if now is not None else None

                    assert history.record(me, "cas", f"swap/{index}", (expected, value), swap) == (True, value)
                    last_swap[index] = step
                except Unavailable:
                    return  # the kill
                except BaseException as error:
                    failures.append(error)
                    return

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    started.wait()
    wait_until(lambda: len(ranks) > 400 and len([n for n in os.listdir(state) if n.startswith("snapshot-")]) > 1, 60)
    kill(server)
    for thread in threads:
        thread.join(timeout=30)
    acked = list(ranks)
    assert not failures, failures
    assert len(set(acked)) == len(acked), "a counter value was handed out twice"

    restarted = start_server("lock", *args, port=server.port)
    with KVStore(restarted.address) as store:
        counter = history.record("reader", "add", "rank", 0, lambda: store.add("rank", 0))
        # Every acknowledged add is there; each writer may have had one more in flight at the kill.
        assert len(acked) <= counter <= len(acked) + WRITERS, (counter, len(acked))
        for i in range(WRITERS):
            for key in (f"set/{i}", f"swap/{i}"):
                history.record("reader", "get", key, None, lambda: store.get(key).decode())  # noqa: B023
            assert int(store.get(f"set/{i}")) in (last_set[i], last_set[i] + 1)
            assert int(store.get(f"swap/{i}")) in (last_swap[i], last_swap[i] + 1)
        next_count = history.record("reader", "add", "rank", 1, lambda: store.add("rank", 1))
        assert next_count == counter + 1 > max(acked)  # the counter continues, nothing reused
    # Before, across and after the kill, each key's operations are explained by one order in real time.
    assert check_linearizable(history.operations) == []
    log_bytes = sum(f.stat().st_size for f in (state / "wal").iterdir())
    assert log_bytes < 1 << 20, f"{log_bytes} bytes of log are left; snapshots should have pruned it"


def test_a_retried_add_swap_or_acquire_is_applied_once_across_a_restart(start_server, tmp_path):
    args = ("--state-dir", str(tmp_path / "lock-state"))
    server = start_server("lock", *args)
    add = lock_pb2.AddRequest(key="joined", delta=1, request_id="add-1")
    swap = lock_pb2.CompareAndSwapRequest(key="leader", expect_absent=True, desired=b"me", request_id="swap-1")
    acquire = lock_pb2.AcquireRequest(name="model", owner="me", ttl_ms=30_000, request_id="acquire-1")
    with grpc.insecure_channel(server.address) as channel:
        kv, locks = lock_pb2_grpc.KeyValueStub(channel), lock_pb2_grpc.LockStub(channel)
        first = (kv.Add(add, timeout=10), kv.CompareAndSwap(swap, timeout=10), locks.Acquire(acquire, timeout=10))
    kill(server)
    restarted = start_server("lock", *args, port=server.port)
    with grpc.insecure_channel(restarted.address) as channel:
        kv, locks = lock_pb2_grpc.KeyValueStub(channel), lock_pb2_grpc.LockStub(channel)
        # The responses were lost with the process; the retries get the same answers.
        assert (
            kv.Add(add, timeout=10),
            kv.CompareAndSwap(swap, timeout=10),
            locks.Acquire(acquire, timeout=10),
        ) == first
        assert kv.Add(lock_pb2.AddRequest(key="joined", delta=0), timeout=10).value == 1
        (state,) = locks.Status(lock_pb2.LockStatusRequest(name="model"), timeout=10).locks
        assert [h.fencing_token for h in state.holders] == [first[2].fencing_token]


def test_a_release_whose_answer_was_lost_is_answered_after_a_restart(start_server, tmp_path):
    args = ("--state-dir", str(tmp_path / "lock-state"))
    server = start_server("lock", *args)
    with grpc.insecure_channel(server.address) as channel:
        stub = lock_pb2_grpc.LockStub(channel)
        granted = stub.Acquire(lock_pb2.AcquireRequest(name="r", owner="me", ttl_ms=30_000), timeout=10)
        release = lock_pb2.ReleaseRequest(name="r", lease_id=granted.lease_id)
        stub.Release(release, timeout=10)  # its answer is taken as lost: the caller retries after the restart
    kill(server)
    restarted = start_server("lock", *args, port=server.port)
    with grpc.insecure_channel(restarted.address) as channel:
        lock_pb2_grpc.LockStub(channel).Release(release, timeout=10)


@pytest.mark.slow
def test_contended_grants_stay_exclusive_and_fenced_across_a_kill_9(start_server, tmp_path):
    """Three clients take turns at one lock while the service is killed and restarted: checked on their
    recorded holds, no two ever held it at once and every later grant carries a larger fencing token."""
    args = ("--state-dir", str(tmp_path / "lock-state"))
    server = start_server("lock", *args)
    holds: list[Hold] = []
    stop = threading.Event()

    def contend(name: str) -> None:
        with LockClient(server.address, name) as client:
            while not stop.is_set():
                requested = time.monotonic()
                # A long lease: under test are the grants across the restart, not a lease that a loaded
                # machine lets lapse between the restart and the retried release.
                held = client.acquire("resource", ttl=60, timeout=60)
                granted = time.monotonic()
                time.sleep(0.002)  # the critical section
                holds.append(Hold(name, "resource", held.fencing_token, False, requested, granted, granted,
                                  time.monotonic()))  # fmt: skip
                client.release(held)  # retried through the restart: idempotent

    threads = [in_thread(contend, f"c{i}") for i in range(3)]
    wait_until(lambda: len(holds) >= 30, 60)
    kill(server)
    before_kill = len(holds)
    time.sleep(DOWNTIME)
    start_server("lock", *args, port=server.port)
    wait_until(lambda: len(holds) >= before_kill + 30, 60)
    stop.set()
    for thread, outcome in threads:
        thread.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
    assert check_locks(holds) == []


@pytest.mark.slow
def test_a_client_mid_sequence_and_a_held_lock_ride_through_a_restart(start_server, tmp_path):
    args = ("--state-dir", str(tmp_path / "lock-state"))
    server = start_server("lock", *args)
    ttl = 3.0
    store = KVStore(server.address)
    holder, waiter = LockClient(server.address, "holder"), LockClient(server.address, "waiter")
    joined: list[int] = []

    def rendezvous() -> None:
        """What workers do: take a rank from a counter, publish an address, wait for it, read it back."""
        for _ in range(200):
            rank = store.add("job/next-rank", 1) - 1
            store.set(f"job/addr/{rank}", f"host:{rank}")
            store.wait([f"job/addr/{rank}"], timeout=30)
            assert store.get(f"job/addr/{rank}") == f"host:{rank}".encode()
            joined.append(rank)

    with holder.lock("model", ttl=ttl) as held:
        queued, granted = in_thread(waiter.acquire, "model", ttl=5, timeout=60)
        wait_until(lambda: waiters_of(holder, "model") == ["waiter"])
        sequence, outcome = in_thread(rendezvous)
        wait_until(lambda: len(joined) >= 20)
        kill(server)
        time.sleep(DOWNTIME)
        start_server("lock", *args, port=server.port)
        restarted_at = time.monotonic()
        sequence.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        assert joined == list(range(200)), "a rank was skipped or handed out twice"
        # The waiter's Acquire was lost with the process; its retry queues again behind the kept lock.
        wait_until(lambda: waiters_of(holder, "model") == ["waiter"], timeout=30)
        time.sleep(max(0.0, restarted_at + 1.5 * ttl - time.monotonic()))  # the restored lease lives by renewals
        assert not held.lost
        (state,) = holder.status("model")
        assert [(h.owner, h.fencing_token) for h in state.holders] == [("holder", held.fencing_token)]
    queued.join(timeout=30)
    assert granted["result"].fencing_token > held.fencing_token
    for client in (store, holder, waiter):
        client.close()


def test_without_a_state_dir_the_lock_service_says_so_and_keeps_nothing(start_server, tmp_path):
    server = start_server("lock")
    with KVStore(server.address) as store:
        store.set("k", "v")
        kill(server)
        start_server("lock", port=server.port)
        assert store.compare_set("k", None, "again") == (True, b"again")  # "k" died with the process
    assert "no --state-dir" in (tmp_path / f"lock-{server.port}.log").read_text()


def test_barrier_clients_reopen_their_sessions_and_a_wait_in_progress_completes(start_server):
    server = start_server("barrier")
    with (
        BarrierClient(server.address, "a", session_ttl=1.0, barriers=["step"]) as a,
        BarrierClient(server.address, "b", session_ttl=1.0, barriers=["step"]) as b,
    ):
        first, outcome = in_thread(a.wait, "step", 2, timeout=30)
        assert b.wait("step", 2, timeout=30).generation == 0
        first.join(timeout=10)
        assert outcome["result"].generation == 0

        waiting, outcome = in_thread(a.wait, "step", 2, timeout=60)  # in progress when the service dies
        wait_for_arrivals(b, "step", 1)
        kill(server)
        time.sleep(DOWNTIME)
        start_server("barrier", port=server.port)
        wait_until(lambda: a.session_lost is not None and b.session_lost is not None, timeout=30)
        # The restarted service lost the generation in progress; a's wait was sent again and counts.
        wait_for_arrivals(b, "step", 1, timeout=30)
        released = b.wait("step", 2, timeout=30)
        waiting.join(timeout=30)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["result"].generation == released.generation == 0  # generations restart with the service

        following, outcome = in_thread(a.wait, "step", 2, timeout=30)
        assert b.wait("step", 2, timeout=30).generation == 1
        following.join(timeout=10)
        (state,) = b.status("step")
        assert outcome["result"].generation == 1 and state.broken_reason == ""
