"""The lock and barrier services on etcd (--store etcd://...): replicas that keep no state of their own
and serve any client, whichever replica a call reaches. test_lock.py and test_barrier.py run the API's
guarantees on both stores."""

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid

import grpc
import numpy as np
import pytest

from nanodist.client import BarrierBroken, BarrierClient, FailedPrecondition, KVStore, LockClient, ParameterServerClient
from nanodist.etcd import rpc_pb2, rpc_pb2_grpc
from nanodist.v1 import lock_pb2, lock_pb2_grpc
from tests.conftest import etcd_url, nanodist_command
from tests.history import Arrival, History, Hold, check_barriers, check_linearizable, check_locks
from tests.integration.test_barrier import in_thread, wait_for_arrivals, worker
from tests.integration.test_elastic import group_rank, kill_once_training
from tests.integration.test_lock import wait_until


def kill(server) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()


def test_a_retried_add_swap_or_acquire_is_answered_once_by_another_replica(start_server, etcd_cluster):
    first_replica, second_replica = (start_server("lock", "--store", etcd_url(etcd_cluster)) for _ in range(2))
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


def test_a_request_lease_revoked_behind_a_replica_is_replaced_and_the_retry_still_answered_once(
    start_server, etcd_cluster
):
    """The lease that request ids live under is gone (revoked, or lapsed while the replica was frozen):
    the next Add gets a new one instead of failing with etcd's 'requested lease not found'."""
    replica = start_server("lock", "--store", etcd_url(etcd_cluster))
    with grpc.insecure_channel(replica.address) as channel:
        kv = lock_pb2_grpc.KeyValueStub(channel)
        assert kv.Add(lock_pb2.AddRequest(key="n", delta=1, request_id="a-1"), timeout=10).value == 1
        with grpc.insecure_channel(etcd_cluster[0].endpoint) as etcd:
            leases = rpc_pb2_grpc.LeaseStub(etcd)
            for lease in leases.LeaseLeases(rpc_pb2.LeaseLeasesRequest(), timeout=10).leases:
                leases.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease.ID), timeout=10)
        assert kv.Add(lock_pb2.AddRequest(key="n", delta=1, request_id="a-2"), timeout=10).value == 2
        assert kv.Add(lock_pb2.AddRequest(key="n", delta=1, request_id="a-2"), timeout=10).value == 2
        swap = lock_pb2.CompareAndSwapRequest(key="k", expect_absent=True, desired=b"v", request_id="s-1")
        assert kv.CompareAndSwap(swap, timeout=10).swapped


@pytest.mark.slow
def test_clients_of_two_replicas_share_one_lock_and_one_counter(start_server, etcd_cluster):
    """Clients split over two replicas contend for one lock and add to one counter: checked on their
    recorded calls, no two held the lock at once, every later grant had a larger token, and the
    counter's history is linearizable."""
    replicas = [start_server("lock", "--store", etcd_url(etcd_cluster)) for _ in range(2)]
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


def test_a_waiter_on_a_killed_replica_leaves_the_queue_within_its_lease(start_server, etcd_cluster):
    """The replica serving a waiter renews its lease; when it dies, the lease lapses and the waiter no
    longer stands in the way of the next."""
    serving, other = (start_server("lock", "--store", etcd_url(etcd_cluster)) for _ in range(2))
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
    for role, args, message in [
        ("lock", ["--store", "redis://x:1"], "expected 'embedded' or etcd://HOST:PORT"),
        ("barrier", ["--store", "redis://x:1"], "expected 'embedded' or etcd://HOST:PORT"),
        ("barrier", ["--store", "etcd://host"], "'host' is not HOST:PORT"),
        ("lock", ["--store", "etcd://127.0.0.1:2379", "--state-dir", str(tmp_path)], "--state-dir: the etcd store"),
    ]:
        done = subprocess.run(nanodist_command("serve", role, "--port", "0", *args), capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, (role, args, done.stderr)


@pytest.mark.slow
def test_the_lock_service_rides_through_losing_the_etcd_member_it_talks_to(start_server, etcd_cluster):
    """Three etcd members; the member the replica uses first is killed with kill -9 mid-run. The
    replica moves to the next, the clients' retries land there, a held lock keeps its lease, and
    every acknowledged add is counted once in a linearizable history."""
    store = etcd_url(etcd_cluster)
    replica = start_server("lock", "--store", store)
    history = History()
    stop = threading.Event()

    def add(name: str) -> None:
        with KVStore(replica.address) as kv:
            while not stop.is_set():
                history.record(name, "add", "count", 1, lambda: kv.add("count", 1))  # noqa: B023

    holder = LockClient(replica.address, "holder")
    with holder.lock("model", ttl=10) as held:  # long: the member's loss is under test, not the lease
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


def test_a_lapsed_member_of_one_replica_breaks_the_barrier_for_waiters_on_the_other(start_server, etcd_cluster):
    near, far = (start_server("barrier", "--store", etcd_url(etcd_cluster)) for _ in range(2))
    doomed = worker("hold-session", near.address, "doomed", "step", "2")
    assert doomed.stdout.readline().strip() == "ready"
    # Only the doomed member's session is to lapse: the others' are long, so that a loaded machine keeps them.
    a, b = BarrierClient(near.address, "a", session_ttl=20), BarrierClient(far.address, "b", session_ttl=20)
    waits = [in_thread(c.wait, "step", 3, timeout=60) for c in (a, b)]
    wait_for_arrivals(b, "step", 2)
    doomed.kill()
    doomed.wait()
    for thread, outcome in waits:
        thread.join(timeout=30)
        error = outcome.get("error")
        assert isinstance(error, BarrierBroken) and error.code == grpc.StatusCode.ABORTED, outcome
        assert error.missing == ["doomed"] and "stopped heartbeating" in error.message
    (state,) = b.status("step")
    assert state.lapsed_member == "doomed"
    a.close()
    b.close()


@pytest.mark.slow
def test_members_on_two_replicas_cycle_through_30_generations_none_released_early(start_server, etcd_cluster):
    replicas = [start_server("barrier", "--store", etcd_url(etcd_cluster)) for _ in range(2)]
    procs = [worker("cycle", replicas[i % 2].address, f"w{i}", "4", "30") for i in range(4)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    arrivals = [
        Arrival(f"w{i}", "cycle", int(generation), float(start), float(end))
        for i, output in enumerate(outputs)
        for generation, start, end in (line.split() for line in output.splitlines() if line != "done")
    ]
    assert len(arrivals) == 4 * 30 and check_barriers(arrivals, parties=4) == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_elastic_job_on_replicas_of_both_services_survives_a_killed_worker(start_server, etcd_cluster, tmp_path):
    """Each worker names both replicas of the barrier and lock services, its own first, all on one etcd: the
    ranks, generations and decisions they share live there, and a worker killed mid-run is left behind."""
    ps = start_server("ps", "--mode", "bsp", "--num-workers", "1")
    barriers = [start_server("barrier", "--store", etcd_url(etcd_cluster)) for _ in range(2)]
    locks = [start_server("lock", "--store", etcd_url(etcd_cluster)) for _ in range(2)]
    run_id = f"elastic-{uuid.uuid4().hex[:8]}"

    def replicas(servers: list, i: int) -> str:
        """Both replicas, worker i's own first: it uses that one and would move to the other."""
        return f"{servers[i % 2].address},{servers[(i + 1) % 2].address}"

    def start(i: int) -> subprocess.Popen[str]:
        command = nanodist_command(
            "worker",
            *("--backend", "tcp", "--group-size", "0", "--elastic", "--join-window", "30", "--max-workers", "3"),
            *("--ps", ps.address, "--barrier", replicas(barriers, i), "--lock", replicas(locks, i)),
            *(
                "--run-id",
                run_id,
                "--runs-dir",
                str(tmp_path),
                "--timeout",
                "60",
                "--epochs",
                "8",
                "--min-workers",
                "2",
            ),
        )
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    workers = [start(i) for i in range(3)]
    ranks = [group_rank(w) for w in workers]
    victim = workers[ranks.index(1)]
    survivors = [w for w in workers if w is not victim]
    kill_once_training(victim)
    outputs = [w.communicate(timeout=300)[0] for w in survivors]
    logged = "".join(outputs)
    assert [w.returncode for w in survivors] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert logged.count("generation 1: 2 workers (was 3)") == 1, logged[-3000:]
    assert f":{victim.pid})" in logged.split("generation 1: 2 workers (was 3)")[1].splitlines()[0]
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["final_test_accuracy"] >= 0.95, metrics["epochs"]


@pytest.mark.slow
def test_clients_given_every_replica_ride_through_a_kill_9_of_the_one_they_use(start_server, etcd_cluster):
    """Clients name both replicas of each service; the replicas they use are killed with kill -9 mid-run.
    The clients move to the other replicas: their adds are counted once each, the held lock keeps its
    lease, and the barrier sessions live on, so the next wait is released with nothing broken."""
    locks = [start_server("lock", "--store", etcd_url(etcd_cluster)) for _ in range(2)]
    barriers = [start_server("barrier", "--store", etcd_url(etcd_cluster)) for _ in range(2)]
    lock_address = ",".join(s.address for s in locks)
    barrier_address = ",".join(s.address for s in barriers)
    history = History()
    stop = threading.Event()

    def add() -> None:
        with KVStore(lock_address) as kv:
            while not stop.is_set():
                history.record("adder", "add", "count", 1, lambda: kv.add("count", 1))  # noqa: B023

    # Sessions and the lease outlive the move to the other replica by far; their lapse is not under test.
    members = [BarrierClient(barrier_address, m, session_ttl=10) for m in ("a", "b")]
    holder = LockClient(lock_address, "holder")
    with holder.lock("model", ttl=10) as held:
        adder = in_thread(add)
        waits = [in_thread(m.wait, "before", 2, timeout=30) for m in members]
        for thread, outcome in waits:
            thread.join(timeout=30)
            assert "result" in outcome, outcome
        wait_until(lambda: len(history.operations) >= 20, 60)
        kill(locks[0])
        kill(barriers[0])
        acked = len(history.operations)
        wait_until(lambda: len(history.operations) >= acked + 20, 60)
        waits = [in_thread(m.wait, "after", 2, timeout=60) for m in members]
        for thread, outcome in waits:
            thread.join(timeout=60)
            assert outcome.get("result") is not None, outcome
        assert not held.lost
    stop.set()
    adder[0].join(timeout=60)
    assert "error" not in adder[1], adder[1].get("error")
    assert check_linearizable(history.operations) == []
    with KVStore(locks[1].address) as kv:
        assert kv.add("count", 0) == len(history.operations)
    assert all(not s.broken_reason and not s.lapsed_member for s in members[0].status())
    for member in members:
        member.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_freezing_an_etcd_member_and_a_lock_replica_past_the_lease_leaves_the_histories_clean(
    start_server, etcd_cluster
):
    """SIGSTOP of the etcd member the replicas use first and of one lock replica, for longer than the
    lock's lease, then SIGCONT, while four clients take turns at a lock and, holding it, push to a
    parameter server with their fencing tokens. Holders on the frozen replica lose their leases; what
    the records show: holds that were released never overlapped and their tokens grew, the counter
    is linearizable, and the parameter server never accepted a token older than one it had accepted."""
    store = etcd_url(etcd_cluster)
    first, second = (start_server("lock", "--store", store) for _ in range(2))
    ps = start_server("ps")
    with ParameterServerClient([ps.address]) as client:
        client.init({"w": np.zeros(4, np.float32)})
    holds: list[Hold] = []
    pushes: list[tuple[float, float, int]] = []  # (sent, answered, token) of each push the server accepted
    refused: list[int] = []
    history = History()
    stop = threading.Event()
    ttl = 2.0

    def contend(name: str, address: str) -> None:
        with (
            LockClient(address, name, timeout=120) as locks,
            KVStore(address, timeout=120) as kv,
            ParameterServerClient([ps.address]) as shard,
        ):
            while not stop.is_set():
                requested = time.monotonic()
                held = locks.acquire("resource", ttl=ttl, timeout=120)
                granted = sent = time.monotonic()
                try:
                    shard.push({"w": np.ones(4, np.float32)}, fencing_token=held.fencing_token)
                    pushes.append((sent, time.monotonic(), held.fencing_token))
                except FailedPrecondition:
                    refused.append(held.fencing_token)  # a newer holder's token reached the server first
                history.record(name, "add", "count", 1, lambda: kv.add("count", 1))  # noqa: B023
                try:
                    locks.release(held)
                except FailedPrecondition:
                    continue  # its lease lapsed while a replica or etcd member was frozen: it held no longer
                holds.append(Hold(name, "resource", held.fencing_token, False, requested, granted, granted,
                                  time.monotonic()))  # fmt: skip

    both = [f"{first.address},{second.address}", f"{second.address},{first.address}"]
    threads = [in_thread(contend, f"c{i}", both[i % 2]) for i in range(4)]
    wait_until(lambda: len(holds) >= 20, 120)
    frozen = [etcd_cluster[0].process, first.process]
    for process in frozen:
        process.send_signal(signal.SIGSTOP)
    time.sleep(2.5 * ttl)  # the fault itself: frozen for longer than the lease
    for process in frozen:
        process.send_signal(signal.SIGCONT)
    thawed = len(holds)
    wait_until(lambda: len(holds) >= thawed + 20, 180)
    stop.set()
    for thread, outcome in threads:
        thread.join(timeout=180)
        assert "error" not in outcome, outcome.get("error")
    assert check_locks(holds) == []
    assert check_linearizable(history.operations) == []
    stale = [(a, b) for a in pushes for b in pushes if a[1] < b[0] and b[2] < a[2]]
    assert not stale, f"the server accepted token {stale[0][1][2]} after {stale[0][0][2]}"
    print(f"\n{len(holds)} holds released, {len(pushes)} fenced pushes accepted, {len(refused)} refused")


def etcd_leader(members: list) -> object:
    """The member that leads the etcd cluster now."""
    for member in members:
        if member.process.poll() is not None:
            continue
        with grpc.insecure_channel(member.endpoint) as channel:
            status = rpc_pb2_grpc.MaintenanceStub(channel).Status(rpc_pb2.StatusRequest(), timeout=10)
        if status.leader == status.header.member_id:
            return member
    raise AssertionError("no etcd member leads")


def child_serving(parent: int, role: str) -> int:
    """The pid of the first `nanodist serve ROLE` that process `parent` started."""
    for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f"serve\0{role}\0".encode() in f.read():
                return int(pid)
    raise AssertionError(f"no {role} replica under pid {parent}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nanodist_up_on_etcd_trains_through_kill_9_of_the_etcd_leader_a_lock_replica_and_a_barrier_replica(
    etcd_cluster, tmp_path
):
    store = etcd_url(etcd_cluster, "up")
    command = nanodist_command(
        "up", "--store", store, "--replicas", "2", "--epochs", "10", "--slow-ms", "20",
        "--run-id", "up-etcd", "--runs-dir", str(tmp_path),
    )  # fmt: skip
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert up.stdout is not None
    faults = {2: "etcd leader", 4: "lock", 6: "barrier"}  # at the end of these epochs, mid-run
    done, output = 0, []
    for line in up.stdout:
        output.append(line)
        if not re.search(r"epoch \d+: .*test accuracy", line):
            continue
        done += 1
        if faults.get(done) == "etcd leader":
            leader = etcd_leader(etcd_cluster)
            leader.process.kill()  # type: ignore[attr-defined]
        elif done in faults:
            os.kill(child_serving(up.pid, faults[done]), signal.SIGKILL)
    assert up.wait(timeout=60) == 0, "".join(output[-60:])
    logged = "".join(output)
    assert done == 10, logged[-3000:]
    for role in ("lock", "barrier"):  # the launcher started the killed replica again; the job never waited on it
        assert f"{role}-0 exited with status -9; starting it again" in logged, logged[-3000:]
    metrics = json.loads((tmp_path / "up-etcd" / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.95
