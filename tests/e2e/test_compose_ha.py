"""docker-compose.ha.yml: the coordination state on three etcd members, two replicas of the lock and
barrier services, and workers that name both; one of each is lost mid-training for good."""

import json
import time

from tests.e2e.test_compose import _wait_member, epochs_done

HA_FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.ha.yml"]


def test_training_goes_on_through_losing_an_etcd_member_a_lock_replica_and_a_barrier_replica(cluster):
    epochs = 10
    c = cluster(NANODIST_EPOCHS=str(epochs))
    c.files = HA_FILES
    up = c.compose("up", "-d", "--no-build", "--scale", "worker=2")
    assert up.returncode == 0, up.stderr
    workers = c.containers("worker") + c.containers("mpi-group")
    rank0 = next(w for w in c.containers("worker") if _wait_member(c, w) == 0)  # it evaluates, once per epoch
    deadline = time.monotonic() + 300
    while epochs_done(c, rank0) < 3:
        assert time.monotonic() < deadline, f"epoch 3 not reached:\n{c.logs(rank0)[-2000:]}"
        time.sleep(0.5)
    lost = [c.containers(service)[0] for service in ("etcd-0", "lock", "barrier")]
    # `docker kill` is a stop that no restart policy undoes: these three are gone for good.
    assert c.compose("kill", "-s", "SIGKILL", "etcd-0", "lock", "barrier").returncode == 0
    c.wait_exited(workers, timeout=600)
    for container in workers:
        assert c.state(container)["State"]["ExitCode"] == 0, c.logs(container)[-3000:]
    assert not any(c.state(container)["State"]["Running"] for container in lost)
    metrics = json.loads((c.runs / c.run_id / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.95 and len(metrics["epochs"]) == epochs
