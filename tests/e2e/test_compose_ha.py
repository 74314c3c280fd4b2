"""docker-compose.ha.yml: the coordination state on three etcd members, two replicas of the lock and
barrier services, each shard a replica set of two, and workers that name every replica; one of each
(shard 0's primary) is killed mid-training."""

import json
import time

from tests.e2e.test_compose import _wait_member, epochs_done, kill_9

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
    # Their processes, from the host, as a machine's loss or the OOM killer would end them: the job
    # must not wait for them to come back (they do, later, through their restart policy).
    primary = next(s for s in ("ps-0", "ps-0-b") if "is primary of replica set 'shard-0'" in c.logs(c.containers(s)[0]))
    restarts = {service: kill_9(c, service) for service in ("etcd-0", "lock", "barrier", primary)}
    c.wait_exited(workers, timeout=600)
    for container in workers:
        assert c.state(container)["State"]["ExitCode"] == 0, c.logs(container)[-3000:]
    for service, before in restarts.items():  # each was killed mid-run, not merely stopped
        assert c.state(c.containers(service)[0])["RestartCount"] > before, service
    backup = "ps-0-b" if primary == "ps-0" else "ps-0"
    assert "is primary of replica set 'shard-0'" in c.logs(c.containers(backup)[0]), "the backup took over"
    metrics = json.loads((c.runs / c.run_id / "metrics.json").read_text())
    assert metrics["final_test_accuracy"] >= 0.95 and len(metrics["epochs"]) == epochs
