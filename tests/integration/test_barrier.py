import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from nanodist.client import BarrierBroken, BarrierClient, FailedPrecondition, InvalidArgument
from nanodist.v1 import barrier_pb2, barrier_pb2_grpc
from tests.conftest import etcd_url, health_status
from tests.history import Arrival, check_barriers


def worker(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.coord_worker", *args],
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def wait_for_arrivals(client: BarrierClient, name: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [s for s in client.status() if s.name == name]
        if states and len(states[0].arrived) >= count:
            return
        time.sleep(0.02)
    raise TimeoutError(f"{count} arrivals at {name} not seen")


@pytest.fixture(params=["embedded", "etcd"])
def barrier_server(request, start_server):
    """Starts `nanodist serve barrier` on each store (etcd: three members): every guarantee of barrier.proto
    holds on both."""

    def start(*args: str):
        if request.param == "etcd":
            return start_server("barrier", "--store", etcd_url(request.getfixturevalue("etcd_cluster")), *args)
        return start_server("barrier", *args)

    return start


def test_processes_cycle_through_50_generations_none_released_early(barrier_server):
    server = barrier_server()
    procs = [worker("cycle", server.address, f"w{i}", "4", "50") for i in range(4)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    arrivals = [
        Arrival(f"w{i}", "cycle", int(generation), float(start), float(end))
        for i, output in enumerate(outputs)
        for generation, start, end in (line.split() for line in output.splitlines() if line != "done")
    ]
    assert len(arrivals) == 4 * 50 and check_barriers(arrivals, parties=4) == []
    with BarrierClient(server.address, "observer") as client:
        (state,) = client.status("cycle")
    assert state.generation == 50 and not state.arrived


def test_a_killed_member_breaks_the_barrier_within_the_lease_ttl(barrier_server):
    server = barrier_server()
    ttl = 2.0  # etcd's shortest lease (3.4, default election timeout)
    doomed = worker("hold-session", server.address, "doomed", "step", str(ttl))
    assert doomed.stdout.readline().strip() == "ready"
    # Only the doomed member's session is to lapse: the others' are long, so that a loaded machine keeps them.
    a, b = (BarrierClient(server.address, m, session_ttl=20) for m in ("a", "b"))
    waits = [in_thread(c.wait, "step", 3, timeout=30) for c in (a, b)]
    wait_for_arrivals(a, "step", 2)
    doomed.kill()
    killed_at = time.monotonic()
    doomed.wait()
    for thread, outcome in waits:
        thread.join(timeout=30)
        error = outcome.get("error")
        assert isinstance(error, BarrierBroken), outcome
        assert error.code == grpc.StatusCode.ABORTED
        assert error.missing == ["doomed"] and "doomed" in error.message
        # The lease told them, well before the wait's own 30 s; how soon depends on the machine's load.
        assert outcome["at"] - killed_at < 15
    a.close()
    b.close()


def test_a_timeout_breaks_the_barrier_for_every_waiter_and_reset_recovers(barrier_server):
    server = barrier_server()
    late = BarrierClient(server.address, "late", barriers=["t"])
    early = BarrierClient(server.address, "early")
    other = BarrierClient(server.address, "other")
    thread, outcome = in_thread(other.wait, "t", 3, timeout=30)
    wait_for_arrivals(early, "t", 1)
    with pytest.raises(BarrierBroken) as failure:
        early.wait("t", 3, timeout=0.3)
    assert failure.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failure.value.missing == ["late"]
    thread.join(timeout=5)
    assert isinstance(outcome["error"], BarrierBroken) and outcome["error"].code == grpc.StatusCode.ABORTED
    (state,) = early.status("t")
    assert "timed out" in state.broken_reason
    with pytest.raises(BarrierBroken, match="call Reset"):
        early.wait("t", 3, timeout=1)
    generation = early.reset("t")
    results = [in_thread(c.wait, "t", 3, timeout=10) for c in (early, late, other)]
    for thread, outcome in results:
        thread.join(timeout=10)
        assert outcome["result"].generation == generation
    for client in (late, early, other):
        client.close()


def test_abort_breaks_the_barrier_for_waiters(barrier_server):
    server = barrier_server()
    a, b = BarrierClient(server.address, "a"), BarrierClient(server.address, "b")
    thread, outcome = in_thread(a.wait, "x", 2, timeout=30)
    wait_for_arrivals(b, "x", 1)
    b.abort("x", "out of memory")
    thread.join(timeout=5)
    assert isinstance(outcome["error"], BarrierBroken)
    assert "aborted by 'b': out of memory" in outcome["error"].message


def test_a_second_wait_by_the_same_member_is_not_a_double_count(barrier_server):
    server = barrier_server()
    a, b = BarrierClient(server.address, "a"), BarrierClient(server.address, "b")
    first = in_thread(a.wait, "idem", 2, timeout=10)
    wait_for_arrivals(b, "idem", 1)
    second = in_thread(a.wait, "idem", 2, timeout=10)
    time.sleep(0.2)  # give a double count the chance to (wrongly) release the barrier
    assert first[1] == {} and second[1] == {}, "one member must not release a 2-party barrier"
    released = b.wait("idem", 2, timeout=10)
    for thread, outcome in (first, second):
        thread.join(timeout=5)
        assert outcome["result"].generation == released.generation == 0
        assert outcome["result"].arrival_index == 0
    assert released.arrival_index == 1


def test_mismatched_parties_is_a_failed_precondition(barrier_server):
    server = barrier_server()
    a, b = BarrierClient(server.address, "a"), BarrierClient(server.address, "b")
    thread, _ = in_thread(a.wait, "p", 3, timeout=2)
    wait_for_arrivals(b, "p", 1)
    with pytest.raises(FailedPrecondition, match="parties: 2 differs from 3"):
        b.wait("p", 2, timeout=1)
    thread.join(timeout=5)


def test_a_thousand_concurrent_waiters_are_all_released(barrier_server):
    server = barrier_server()
    procs = [worker("waiters", server.address, "1000", "500", str(offset)) for offset in (0, 500)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    indexes = sorted(int(i) for out in outputs for i in out.split())
    assert indexes == list(range(1000))


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"name": "", "parties": 2, "member_id": "a"}, "name: must not be empty"),
        ({"name": "n" * 257, "parties": 2, "member_id": "a"}, "name: 257 characters"),
        ({"name": "ok", "parties": 0, "member_id": "a"}, "parties: 0 is outside"),
        ({"name": "ok", "parties": 2, "member_id": ""}, "member_id: must not be empty"),
        (
            {"name": "ok", "parties": 2, "member_id": "a", "timeout_ms": -1},
            "timeout_ms: must be >= 0",
        ),
    ],
)
def test_bad_wait_requests_are_invalid_and_the_server_stays_healthy(barrier_server, request_fields, message):
    server = barrier_server()
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            barrier_pb2_grpc.BarrierStub(channel).Wait(barrier_pb2.WaitRequest(**request_fields), timeout=5)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING


def test_a_negative_session_ttl_is_invalid(barrier_server):
    server = barrier_server()
    with pytest.raises(InvalidArgument, match=r"ttl_ms: -1000 is outside \[100, 3600000\]"):
        BarrierClient(server.address, "a", session_ttl=-1)


def test_a_retried_wait_after_its_release_gets_that_release_not_the_next_generation(barrier_server):
    """A Wait whose answer was lost (its server killed, the network cut) is retried with its request id;
    if its generation released meanwhile, the retry answers that release instead of arriving again."""
    server = barrier_server()
    with grpc.insecure_channel(server.address) as channel:
        stub = barrier_pb2_grpc.BarrierStub(channel)
        wait = barrier_pb2.WaitRequest(name="solo", parties=1, member_id="a", timeout_ms=5000, request_id="wait-1")
        first = stub.Wait(wait, timeout=10)
        assert stub.Wait(wait, timeout=10) == first  # the retry
        fresh = stub.Wait(
            barrier_pb2.WaitRequest(name="solo", parties=1, member_id="a", request_id="wait-2"), timeout=10
        )
        assert (first.generation, fresh.generation) == (0, 1)
        (state,) = stub.Status(barrier_pb2.BarrierStatusRequest(name="solo"), timeout=10).barriers
        assert state.generation == 2
