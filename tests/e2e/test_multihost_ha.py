"""docker-stack.ha.yml on a swarm of three hosts (docker-in-docker nodes on this machine): etcd on
all three, the lock and barrier services twice, each shard a replica set of two. The host that holds
shard 0's primary (and an etcd member) is stopped mid-training; the job completes on the other two,
its backup having taken over.

Several minutes of work, so a plain `pytest` skips it: `make test` and `make e2e-multihost` run it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import build_images
from tests.e2e.multihost import Clock, NotYet, Swarm, docker, newest, placement, wait_until
from tests.e2e.test_multihost import IMAGE, VERSION, WORKERS

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("NANODIST_MULTIHOST") != "1",
        reason="make test and make e2e-multihost run it (NANODIST_MULTIHOST=1)",
    ),
    pytest.mark.timeout(1200),
]

STACK_FILES = ["docker-stack.yml", "docker-stack.ha.yml", "tests/e2e/stacks/workers-off-the-victim.yml"]
# Node 1 is the only manager, so it stays; node 3, the victim, holds shard 0's first replica and no worker.
LABELS = [
    ["nanodist.etcd-0", "nanodist.lock"],
    ["nanodist.etcd-1", "nanodist.lock", "nanodist.ps-1"],
    ["nanodist.etcd-2", "nanodist.ps-0", "nanodist.victim"],
]
PRIMARY = "is primary of replica set 'shard-0'"


@pytest.fixture(scope="module")
def swarm() -> Iterator[tuple[Swarm, Clock]]:
    clock = Clock()
    if not docker("image", "ls", "-q", IMAGE).strip():
        build_images("docker")
    build_images("docker-node")
    nodes = Swarm(3, clock)
    try:
        nodes.start()
        nodes.load(IMAGE)
        for node, labels in zip(nodes.nodes, LABELS, strict=True):
            nodes.label(node, *labels)
        yield nodes, clock
    finally:
        nodes.close()
        clock("multihost HA done")


def kill_task(swarm: Swarm, stack: str, service: str) -> None:
    """kill -9 of a service's running container, wherever it runs (its restart policy starts it again)."""
    (task,) = [t for t in newest(swarm.tasks(stack)) if t.service == service and t.state == "Running"]
    name = f"label=com.docker.swarm.service.name={stack}_{service}"
    for container in swarm.engine(task.node, "ps", "-q", "--filter", name).split():
        swarm.engine(task.node, "kill", "--signal", "KILL", container)


def test_the_ha_stack_trains_through_losing_the_host_of_shard_0s_primary(swarm: tuple[Swarm, Clock]) -> None:
    nodes, clock = swarm
    stack, victim = "ha", nodes.nodes[2]
    env = {"NANODIST_VERSION": VERSION, "NANODIST_RUN_ID": stack, "NANODIST_EPOCHS": "8", "NANODIST_SLOW_MS": "20"}
    nodes.deploy(stack, STACK_FILES, env)
    clock("deployed the HA stack (8 epochs)")
    try:

        def trained_an_epoch() -> None:
            if "] epoch 1: train loss" not in nodes.logs(stack, "worker", 200):
                raise NotYet(", ".join(f"{t.slot} {t.state}" for t in newest(nodes.tasks(stack))))

        wait_until("rank 0 to finish epoch 1", trained_an_epoch, 420, 2.0)

        def ps_0_is_primary() -> None:
            if PRIMARY not in nodes.logs(stack, "ps-0", 400):
                raise NotYet("ps-0 is a backup")

        if PRIMARY not in nodes.logs(stack, "ps-0", 400):  # ps-0-b won the first election: move it to ps-0
            kill_task(nodes, stack, "ps-0-b")
            wait_until("ps-0 to take over", ps_0_is_primary, 60, 1.0)
        before = newest(nodes.tasks(stack))
        print(f"\nplacement before the stop:\n{placement(before)}\n", flush=True)
        assert not [t for t in before if t.service in WORKERS and t.node == victim], placement(before)
        nodes.kill(victim)
        clock(f"stopped {victim}, which ran ps-0, shard 0's primary")
        tasks = nodes.wait_job(stack, timeout=600)
        print(f"\nplacement after the stop:\n{placement(tasks, down=[victim])}\n", flush=True)
        for task in newest(tasks):
            if task.service in WORKERS and task.node != victim:
                assert task.state == "Complete", f"{task.slot}: {task.state} {task.error}\n" + nodes.logs(
                    stack, task.service, 100
                )
        assert PRIMARY in nodes.logs(stack, "ps-0-b", 400), "ps-0-b took over"
        path = f"/var/lib/docker/volumes/{stack}_runs/_data/{stack}/metrics.json"
        found = [text for n in nodes.nodes if n != victim and (text := nodes.read(n, path)) is not None]
        assert found, f"no surviving node has {path}"
        metrics = json.loads(found[0])
        clock(f"trained through the stop: accuracy {metrics['final_test_accuracy']}, {time.monotonic():.0f}")
        assert metrics["final_test_accuracy"] >= 0.95 and len(metrics["epochs"]) == 8
    finally:
        nodes.remove(stack)
