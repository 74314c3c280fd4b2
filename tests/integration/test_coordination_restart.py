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

    def writer(index: int) -> None:
        with KVStore(server.address, retry=NO_RETRY) as store:
            started.wait()
            step = 0
            while True:
                step += 1
                try:
                    ranks.append(store.add("rank", 1))
                    store.set(f"set/{index}", str(step))
                    last_set[index] = step
                    expected = str(step - 1) if step > 1 else None
                    assert store.compare_set(f"swap/{index}", expected, str(step)) == (True, str(step).encode())
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
        counter = store.add("rank", 0)
        # Every acknowledged add is there; each writer may have had one more in flight at the kill.
        assert len(acked) <= counter <= len(acked) + WRITERS, (counter, len(acked))
        for i in range(WRITERS):
            assert int(store.get(f"set/{i}")) in (last_set[i], last_set[i] + 1)
            assert int(store.get(f"swap/{i}")) in (last_swap[i], last_swap[i] + 1)
        assert store.add("rank", 1) == counter + 1 > max(acked)  # the counter continues, nothing reused
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
