"""The docker-compose cluster, built from nothing on this machine (offline base image, wheelhouse)."""

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanodist.client import ParameterServerClient
from nanodist.client.health import check
from nanodist.client.rpc import ClientSecurity, open_channel
from tests.e2e.compose import Cluster


def test_compose_cluster_trains_digits_with_three_tcp_workers_and_an_mpi_group(cluster):
    c = cluster()
    began = time.monotonic()
    up = c.compose("up", "-d", "--no-build", "--scale", "worker=3")
    assert up.returncode == 0, up.stderr
    workers = c.containers("worker") + c.containers("mpi-group")
    assert len(workers) == 4
    c.wait_exited(workers, timeout=600)
    finished = time.monotonic() - began
    for container in workers:
        assert c.state(container)["State"]["ExitCode"] == 0, c.logs(container)[-3000:]
    metrics = json.loads((c.runs / c.run_id / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.95 and metrics["world_size"] == 5
    assert (c.runs / c.run_id / "training.png").exists()
    first_step = min(c.state(w)["State"]["StartedAt"] for w in workers)
    print(
        f"\ncompose: up to completion {finished:.1f} s; workers started at {first_step}; "
        f"accuracy {metrics['final_test_accuracy']}; step {metrics['timings']['mean_ms_per_step']['step']:.1f} ms"
    )
    # Every service answers the standard health check from the host; servers keep serving after training.
    for service, port in (("ps-0", 50051), ("ps-1", 50051), ("barrier", 50061), ("lock", 50071)):
        (container,) = c.containers(service)
        networks = c.state(container)["NetworkSettings"]["Networks"]
        address = next(iter(networks.values()))["IPAddress"]
        assert check(f"{address}:{port}", timeout=5) == "SERVING", service
    assert check(f"127.0.0.1:{c.env['PS0_PORT']}", timeout=5) == "SERVING"
    assert check(f"127.0.0.1:{c.env['LOCK_PORT']}", timeout=5) == "SERVING"


def test_a_killed_worker_container_is_named_by_the_others_and_nothing_hangs(cluster):
    c = cluster(NANODIST_EPOCHS="1000")
    assert c.compose("up", "-d", "--no-build", "--scale", "worker=3").returncode == 0
    workers = c.containers("worker")
    deadline = time.monotonic() + 180
    while not all("epoch 1/1000 step" in c.logs(w) for w in workers):
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(1)  # each look reads every container's whole log
    victim = workers[1]
    rank = c.logs(victim).split("] member ")[1].split()[0]  # "[e2e/group-0] member R of 3": R is its global rank
    subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
    killed_at = time.monotonic()
    survivors = [w for w in workers if w != victim] + c.containers("mpi-group")
    c.wait_exited(survivors, timeout=60)
    assert time.monotonic() - killed_at < 30, "the lease TTL is 5 s; survivors must stop well within 30 s"
    for container in survivors:
        log = c.logs(container)
        assert c.state(container)["State"]["ExitCode"] != 0
        assert "nanodist worker: error:" in log, log[-2000:]
        error = log.split("nanodist worker: error:")[1]
        assert f"rank {rank}" in error or f"rank-{rank}" in error, error[:500]


def test_the_tls_variant_trains_with_mutual_tls_and_tokens(cluster, tmp_path):
    certs = tmp_path / "certs"
    subprocess.run([sys.executable, "-m", "nanodist.services.common.devcerts", str(certs)], check=True)
    c = cluster(NANODIST_CERTS_DIR=str(certs), NANODIST_EPOCHS="5")
    c.files = ["-f", "docker-compose.yml", "-f", "docker-compose.tls.yml"]
    up = c.compose("up", "-d", "--no-build", "--scale", "worker=2")
    assert up.returncode == 0, up.stderr
    workers = c.containers("worker") + c.containers("mpi-group")
    c.wait_exited(workers, timeout=600)
    for container in workers:
        assert c.state(container)["State"]["ExitCode"] == 0, c.logs(container)[-3000:]
    metrics = json.loads((c.runs / c.run_id / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.9 and metrics["world_size"] == 4
    address = f"127.0.0.1:{c.env['PS0_PORT']}"
    with pytest.raises(grpc.RpcError):
        check(address, timeout=3)  # plaintext is refused
    mtls = ClientSecurity(str(certs / "ca.pem"), str(certs / "client.pem"), str(certs / "client-key.pem"))
    with open_channel(address, security=mtls) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def kill_9(c: Cluster, service: str) -> int:
    """kill -9 of the service's server process from the host, as the OOM killer would do it (`docker kill`
    counts as a manual stop, which restart policies ignore). Returns the container's restart count then."""
    (container,) = c.containers(service)
    state = c.state(container)
    os.kill(state["State"]["Pid"], signal.SIGKILL)
    return state["RestartCount"]


def wait_restarted(c: Cluster, service: str, restarts_before: int, timeout: float = 60) -> float:
    """Seconds until the service's container runs again after its restart and answers SERVING."""
    began = time.monotonic()
    (container,) = c.containers(service)
    port = {"ps-0": 50051, "barrier": 50061, "lock": 50071}[service]
    while True:
        state = c.state(container)
        if state["RestartCount"] > restarts_before and state["State"]["Running"]:
            address = next(iter(state["NetworkSettings"]["Networks"].values()))["IPAddress"]
            try:
                if check(f"{address}:{port}", timeout=1) == "SERVING":
                    return time.monotonic() - began
            except grpc.RpcError:
                pass
        assert time.monotonic() - began < timeout, f"{service} did not restart within {timeout:g}s: {state['State']}"
        time.sleep(0.2)


def epochs_done(c: Cluster, rank0: str) -> int:
    return c.logs(rank0).count("test accuracy")


def test_servers_killed_mid_training_restart_on_their_own_and_the_job_completes_losing_no_push(cluster):
    """ps-0, then the lock service, then the barrier: each one's process killed with kill -9 mid-training."""
    epochs = 12
    c = cluster(NANODIST_EPOCHS=str(epochs))
    assert c.compose("up", "-d", "--no-build", "--scale", "worker=2").returncode == 0
    workers = c.containers("worker") + c.containers("mpi-group")
    rank0 = next(w for w in c.containers("worker") if _wait_member(c, w) == 0)  # it evaluates, once per epoch
    downtime: dict[str, float] = {}
    for service, at_epoch in (("ps-0", 2), ("lock", 5), ("barrier", 8)):
        deadline = time.monotonic() + 300
        while epochs_done(c, rank0) < at_epoch:
            assert time.monotonic() < deadline, f"epoch {at_epoch} not reached:\n{c.logs(rank0)[-2000:]}"
            time.sleep(0.5)  # each look reads the container's whole log
        time.sleep(0.5)  # mid-epoch
        restarts = kill_9(c, service)
        downtime[service] = wait_restarted(c, service, restarts)
    c.wait_exited(workers, timeout=600)
    for container in workers:
        assert c.state(container)["State"]["ExitCode"] == 0, c.logs(container)[-3000:]
    metrics = json.loads((c.runs / c.run_id / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.95 and len(metrics["epochs"]) == epochs
    # Each group leader's last clock is the number of steps whose pushes ps-0 acknowledged; under BSP
    # every key on ps-0 holds exactly that many updates if no acknowledged push was lost.
    (steps,) = {clocks[-1][0] for clocks in metrics["clocks"].values()}
    with ParameterServerClient([f"127.0.0.1:{c.env['PS0_PORT']}"]) as ps0:
        versions = {k.key: k.version for k in ps0.list_keys()}
    assert versions and set(versions.values()) == {steps}, (versions, steps)
    print(f"\nrestarted and serving again after kill -9: {downtime}; {steps} steps, none lost")


def _wait_member(c: Cluster, container: str, timeout: float = 120) -> int:
    """The rank a worker container logs when the group forms."""
    deadline = time.monotonic() + timeout
    while "] member " not in c.logs(container):
        assert time.monotonic() < deadline, c.logs(container)[-2000:]
        time.sleep(0.5)
    return int(c.logs(container).split("] member ")[1].split()[0])
