"""docker-compose.elastic.yml: an elastic job of a TCP group of worker containers and an MPI group in
one container, which loses members and finishes."""

import json
import os
import re
import signal
import subprocess
import time

from tests.e2e.compose import Cluster

ELASTIC = ["-f", "docker-compose.yml", "-f", "docker-compose.elastic.yml"]


MPI_RANKS = 2  # the mpi-group container's


def start(cluster, workers: int, epochs: int, slow_ms: int = 0) -> tuple[Cluster, dict[int, str]]:
    """The cluster with `workers` worker containers, once all train in its first generation; returns
    rank -> container (the TCP group's ranks come first). A long join window lets every container in,
    however slowly it starts. slow_ms: a pause per step, so that the job lasts a while on a fast machine too."""
    c = cluster(NANODIST_EPOCHS=str(epochs), NANODIST_JOIN_WINDOW="10", NANODIST_SLOW_MS=str(slow_ms))
    c.files = ELASTIC
    up = c.compose("up", "-d", "--no-build", "--scale", f"worker={workers}")
    assert up.returncode == 0, up.stderr
    containers = c.containers("worker")
    (mpi,) = c.containers("mpi-group")
    deadline = time.monotonic() + 180
    while not all(" step " in c.logs(w) for w in [*containers, mpi]):
        assert time.monotonic() < deadline, "training did not start:\n" + c.logs(containers[0])[-2000:]
        time.sleep(1)  # each look reads every container's whole log
    ranks = {int(re.search(rf"\] member (\d+) of {workers}\n", c.logs(w)).group(1)): w for w in containers}  # type: ignore[union-attr]
    return c, ranks


def mpi_rank_pid(container: str) -> int:
    """The host pid of one of the MPI group's ranks (not mpiexec's, nor its proxy's)."""
    top = subprocess.run(["docker", "top", container, "-eo", "pid,args"], capture_output=True, text=True, check=True)
    rows = [line.split(None, 1) for line in top.stdout.splitlines()[1:]]
    pids = [int(pid) for pid, args in rows if "nanodist worker" in args and "mpiexec" not in args]
    assert pids, top.stdout
    return pids[0]


def finish(c: Cluster, containers: list[str]) -> dict:
    c.wait_exited(containers, timeout=300)
    for container in containers:
        assert c.state(container)["State"]["ExitCode"] == 0, c.logs(container)[-3000:]
    return json.loads((c.runs / c.run_id / "metrics.json").read_text())


def wait_for(c: Cluster, containers: list[str], text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in c.logs(w) for w in containers):
        assert time.monotonic() < deadline, f"no {text!r}:\n" + c.logs(containers[0])[-2000:]
        time.sleep(1)  # each look reads every container's whole log


def test_a_stopped_worker_is_left_behind_a_crashed_mpi_group_restarts_and_rejoins_and_the_job_completes(cluster):
    # The job must outlast a loss, a container's restart and its rejoining: 30 epochs of at least 18 steps of
    # 50 ms, 27 s however fast the machine trains (the events take about 20 s), and a minute here.
    c, ranks = start(cluster, 3, epochs=30, slow_ms=50)
    (mpi,) = c.containers("mpi-group")
    world = 3 + MPI_RANKS
    subprocess.run(["docker", "kill", ranks[1]], check=True, capture_output=True)  # a manual stop: no restart
    survivors = [ranks[0], ranks[2], mpi]
    wait_for(c, survivors, f"generation 1: {world - 1} workers (was {world}); left: rank 1")
    # One MPI rank crashes: mpiexec ends the group, the container fails and restarts, and the group,
    # whole again, joins at the next epoch boundary.
    restarts = c.state(mpi)["RestartCount"]
    os.kill(mpi_rank_pid(mpi), signal.SIGKILL)
    wait_for(c, survivors, f"generation 2: 2 workers (was {world - 1})")
    wait_for(c, survivors, f"generation 3: {world - 1} workers (was 2); left: none; joined: ")
    assert c.state(mpi)["RestartCount"] == restarts + 1
    metrics = finish(c, survivors)
    assert metrics["world_size"] == world - 1 and metrics["final_test_accuracy"] >= 0.95
    assert len(metrics["epochs"]) == 30


def test_a_worker_cut_off_from_the_network_is_left_behind_within_the_lease_ttl(cluster):
    # A job that cannot end before the cut lands, however slowly this test gets to it: it is stopped once the
    # survivors train on without the cut-off worker (test_elastic's frozen worker runs such a job to its end).
    c, ranks = start(cluster, 3, epochs=1000)
    victim = ranks[2]
    (mpi,) = c.containers("mpi-group")
    (network,) = c.state(victim)["NetworkSettings"]["Networks"]
    subprocess.run(["docker", "network", "disconnect", network, victim], check=True, capture_output=True)
    cut_at = time.monotonic()
    survivors = [ranks[0], ranks[1], mpi]
    while not all("leaves generation 0" in c.logs(w) for w in survivors):
        assert time.monotonic() - cut_at < 60, c.logs(survivors[0])[-2000:]
        time.sleep(0.1)
    noticed = time.monotonic() - cut_at
    # It stops itself with exit code 1; its restart policy then starts it again (still cut off, it waits
    # for the services), so the stop shows as a restart, or as the exited container.
    while not (c.state(victim)["RestartCount"] or not c.state(victim)["State"]["Running"]):
        assert time.monotonic() - cut_at < 60, c.logs(victim)[-3000:]
        time.sleep(0.1)
    stopped = time.monotonic() - cut_at
    assert c.state(victim)["RestartCount"] or c.state(victim)["State"]["ExitCode"] == 1, c.state(victim)["State"]
    assert "the job goes on without it" in c.logs(victim), c.logs(victim)[-3000:]
    world = 3 + MPI_RANKS
    wait_for(c, survivors, f"generation 1: {world - 1} workers (was {world}); left: rank 2")
    (leader,) = [w for w in survivors if f"generation 1: {world - 1} workers" in c.logs(w)]
    deadline = time.monotonic() + 120
    while " step " not in c.logs(leader).split(f"generation 1: {world - 1} workers")[1]:  # they train on
        assert time.monotonic() < deadline, c.logs(leader)[-2000:]
        time.sleep(1)
    # Both within 60 s (the loops above), half the workers' --timeout of 120 s: the session lease told them, not
    # a timeout. How soon (the TTL, 5 s, and half a second of watching) is bench/recovery.py's to measure.
    print(f"\ncut off: the survivors went on after {noticed:.1f} s, the cut-off worker stopped after {stopped:.1f} s")
