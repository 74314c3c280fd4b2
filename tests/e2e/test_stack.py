"""docker-stack.yml on a single-node Docker Swarm that these tests make and leave, with the image built here:
the workers order their own start-up, take their ranks from the lock service's counter and train to the
end; the shard holding the parameters, killed mid-run, comes back on its own with its write-ahead log."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanodist.client.health import check
from nanodist.client.rpc import ClientSecurity, open_channel
from tests.e2e.conftest import build_images
from tests.e2e.swarm import Stack, docker, init_swarm, leave_swarm, swarm_state

WORKERS = ["worker", "mpi-group"]
SERVERS = ["ps-0", "ps-1", "barrier", "lock"]


@pytest.fixture(scope="module")
def swarm() -> Iterator[None]:
    """`make docker`, then a swarm of this engine alone, left whatever happens."""
    if swarm_state() != "inactive":
        pytest.skip("this engine is in a swarm already; the tests make and leave one of their own")
    build_images("docker")
    try:
        init_swarm()
        yield
    finally:
        leave_swarm()


@pytest.fixture
def stack(swarm):
    stacks: list[Stack] = []

    def make(*files: str, **settings: str) -> Stack:
        stacks.append(Stack(*files, **settings))
        return stacks[-1]

    yield make
    for s in stacks:
        s.remove()
        assert docker("ps", "-aq", "--filter", f"label=com.docker.stack.namespace={s.name}").split() == []


def wait_for_line(stack: Stack, service: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in stack.logs(service):
        assert time.monotonic() < deadline, f"no {text!r} in {service}'s log after {timeout:g}s"
        time.sleep(1)  # each look reads every task's whole log


def assert_all_complete(stack: Stack, tasks: list) -> None:
    failed = [t for t in tasks if not t.state.startswith("Complete")]
    servers = {s: stack.tasks(s) for s in SERVERS} if failed else {}  # a worker waiting out a server names it
    assert not failed, f"{failed}\n{servers}\n" + "\n".join(stack.logs(s)[-3000:] for s in WORKERS)


@pytest.mark.timeout(900)
def test_the_stack_trains_on_a_swarm_through_a_shard_killed_and_restarted_with_its_wal(stack):
    s = stack("docker-stack.yml")
    began = time.monotonic()
    s.deploy()
    # Killed mid-run (kill -9 of the server from the host, as a crash would): the swarm starts a new
    # task on the same node with the same volume, and the workers' retries carry them over the gap.
    wait_for_line(s, "worker", "[rank 0] epoch 2:", timeout=300)
    victim = "ps-0"
    assert "init key" in s.logs(victim)  # it holds some of the parameters
    (shard,) = s.containers(victim)
    os.kill(int(docker("inspect", "-f", "{{.State.Pid}}", shard)), signal.SIGKILL)
    tasks = s.wait_done(WORKERS, timeout=600)
    finished = time.monotonic() - began
    assert_all_complete(s, tasks)
    assert len(tasks) == 4  # 3 `worker` replicas and the MPI group's container
    metrics = json.loads(s.read_runs(f"{s.run_id}/metrics.json"))
    assert metrics["world_size"] == 5 and metrics["final_test_accuracy"] >= 0.95
    log = s.logs("worker")
    assert all(f"member {r} of 3" in log for r in range(3)), log[-3000:]  # ranks from the counter
    # The new task serves once its health check passes; the swarm may still call it Starting until then.
    deadline = time.monotonic() + 120
    shard_tasks = s.tasks(victim)
    while [t.state.split()[0] for t in shard_tasks] != ["Running", "Failed"]:
        assert time.monotonic() < deadline, shard_tasks
        time.sleep(1)
        shard_tasks = s.tasks(victim)
    assert "exit (137)" in shard_tasks[1].error
    assert "replayed" in s.logs(victim), s.logs(victim)[-3000:]  # the new task read the old one's WAL
    # The state services publish their ports on their node: the host reaches them.
    assert check(f"127.0.0.1:{s.env['PS0_PORT']}", timeout=5) == "SERVING"
    assert check(f"127.0.0.1:{s.env['LOCK_PORT']}", timeout=5) == "SERVING"
    print(f"\nstack: deploy to completion {finished:.1f} s; accuracy {metrics['final_test_accuracy']}")


@pytest.mark.timeout(600)
def test_the_tls_stack_trains_with_its_certificates_and_tokens_as_secrets(stack, tmp_path):
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "nanodist.services.common.devcerts", str(certs)], check=True)
    s = stack("docker-stack.yml", "docker-stack.tls.yml", NANODIST_CERTS_DIR=str(certs), NANODIST_EPOCHS="3")
    began = time.monotonic()
    s.deploy()
    tasks = s.wait_done(WORKERS, timeout=400)
    finished = time.monotonic() - began
    assert_all_complete(s, tasks)
    metrics = json.loads(s.read_runs(f"{s.run_id}/metrics.json"))
    assert metrics["world_size"] == 5 and len(metrics["epochs"]) == 3
    print(f"\ntls stack: deploy to completion {finished:.1f} s")
    address = f"127.0.0.1:{s.env['PS0_PORT']}"
    with pytest.raises(grpc.RpcError):
        check(address, timeout=3)  # plaintext is refused
    mtls = ClientSecurity(str(certs / "ca.pem"), str(certs / "client.pem"), str(certs / "client-key.pem"))
    with open_channel(address, security=mtls) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
