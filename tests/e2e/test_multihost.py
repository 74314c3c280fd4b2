"""docker-stack.yml on a swarm of three hosts (docker-in-docker nodes on this machine): the shards on
different nodes, the workers on all three, training to completion; then a node dies mid-training.

Several minutes of work, so a plain `pytest` skips it: `make test` and `make e2e-multihost` run it (as does
NANODIST_MULTIHOST=1 .venv/bin/pytest -s tests/e2e/test_multihost.py).
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Iterator

import pytest
import yaml

from tests.conftest import ROOT
from tests.e2e.conftest import build_images
from tests.e2e.multihost import (
    FINISHED,
    Clock,
    NotYet,
    Swarm,
    Task,
    docker,
    newest,
    placement,
    wait_until,
)

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("NANODIST_MULTIHOST") != "1",
        reason="make test and make e2e-multihost run it (NANODIST_MULTIHOST=1)",
    ),
    pytest.mark.timeout(1200),
]

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    VERSION = tomllib.load(_f)["project"]["version"]
IMAGE = f"nanodist:{VERSION}"
STACK_FILES = ["docker-stack.yml"]
# Node 1 (the manager) holds shard 0 and the lock service, node 2 shard 1, node 3 no state at all.
# Node 3 is the one killed by default: the state of the other two is pinned to them with its volumes.
LABELS = [["nanodist.ps-0", "nanodist.lock"], ["nanodist.ps-1"], []]
VICTIM = int(os.environ.get("NANODIST_MULTIHOST_KILL", "3"))  # 2: the node of shard ps-1 instead
SERVERS = ("ps-0", "ps-1", "barrier", "lock")
WORKERS = ("worker", "mpi-group")
with open(os.path.join(ROOT, STACK_FILES[0])) as _f:
    JOB_TIMEOUT = float(yaml.safe_load(_f)["services"]["worker"]["environment"]["NANODIST_TIMEOUT"])


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def swarm(clock: Clock) -> Iterator[Swarm]:
    if not docker("image", "ls", "-q", IMAGE).strip():
        build_images("docker")
    build_images("docker-node")
    clock("node image ready")
    nodes = Swarm(3, clock)
    try:
        nodes.start()
        nodes.load(IMAGE)
        for node, labels in zip(nodes.nodes, LABELS, strict=True):
            if labels:
                nodes.label(node, *labels)
        clock("labels: " + "; ".join(f"{n}: {', '.join(ls) or '-'}" for n, ls in zip(nodes.nodes, LABELS, strict=True)))
        yield nodes
    finally:
        nodes.close()
        clock("multihost done")


def deploy(swarm: Swarm, stack: str, **settings: str) -> None:
    env = {"NANODIST_VERSION": VERSION, "NANODIST_RUN_ID": stack, **settings}
    swarm.deploy(stack, STACK_FILES, env)


def nodes_of(tasks: list[Task], *services: str) -> set[str]:
    return {t.node for t in newest(tasks) if t.service in services}


def test_the_stack_trains_on_three_nodes(swarm: Swarm, clock: Clock) -> None:
    began = clock.now()
    deploy(swarm, "train", NANODIST_EPOCHS="10")
    clock("deployed stack `train` (10 epochs)")
    try:

        def stepped() -> None:
            if "epoch 1/10 step" not in swarm.logs("train", "worker", 200):
                raise NotYet(", ".join(f"{t.slot} {t.state}" for t in newest(swarm.tasks("train"))))

        wait_until("the first step of stack `train`", stepped, 300, 0.5)
        first_step = clock.now() - began
        clock(f"first step {first_step:.1f} s after deploy")
        tasks = swarm.wait_job("train", timeout=420)
        took = clock.now() - began
        print(f"\nplacement of stack `train`:\n{placement(tasks)}\n", flush=True)
        for task in newest(tasks):
            if task.service in WORKERS:
                assert task.state == "Complete", f"{task.slot}: {task.state} {task.error}\n" + swarm.logs(
                    "train", task.service
                )
        shards = {t.service: t.node for t in newest(tasks) if t.service in ("ps-0", "ps-1")}
        assert shards["ps-0"] != shards["ps-1"], shards
        workers = nodes_of(tasks, *WORKERS)
        assert workers == set(swarm.nodes), f"workers ran on {sorted(workers)} only"
        path = "/var/lib/docker/volumes/train_runs/_data/train/metrics.json"  # the `runs` volume on rank 0's node
        found = [(n, text) for n in swarm.nodes if (text := swarm.read(n, path)) is not None]
        assert found, f"no node has {path}"
        node, text = found[0]
        metrics = json.loads(text)
        clock(
            f"trained across {len(workers)} nodes in {took:.1f} s from deploy: world {metrics['world_size']}, "
            f"accuracy {metrics['final_test_accuracy']}, metrics.json on {node}; "
            f"step {metrics['timings']['mean_ms_per_step']['step']:.1f} ms (mean over the workers)"
        )
        assert metrics["world_size"] == 5 and metrics["final_test_accuracy"] >= 0.95
    finally:  # the next test deploys on the same nodes: this stack's servers must not hold them
        swarm.remove("train")
        clock("removed stack `train`")


def test_a_killed_node(swarm: Swarm, clock: Clock) -> None:
    """Kill a host mid-training (by default the one without state): what the swarm moves, how the job ends."""
    assert VICTIM in (2, 3), "node 1 is the swarm's only manager: without it nothing is rescheduled or reported"
    deploy(swarm, "kill", NANODIST_EPOCHS="1000")
    clock("deployed stack `kill` (1000 epochs)")

    def trained_an_epoch() -> None:
        if "] epoch 1: train loss" not in swarm.logs("kill", "worker", 200):
            raise NotYet(", ".join(f"{t.slot} {t.state}" for t in newest(swarm.tasks("kill"))))

    wait_until("rank 0 to finish epoch 1 of stack `kill`", trained_an_epoch, 300, 2.0)
    before = newest(swarm.tasks("kill"))
    victim = swarm.nodes[VICTIM - 1]
    on_victim = [t.slot for t in before if t.node == victim]
    assert any(t.startswith(WORKERS) for t in on_victim), placement(before)
    print(f"\nplacement before the kill:\n{placement(before)}\n", flush=True)
    survivors = [t.slot for t in before if t.service in WORKERS and t.node != victim]
    servers = [slot for slot in on_victim if slot.startswith(SERVERS)]  # servers restart; workers never do

    swarm.kill(victim)
    killed_at = time.monotonic()
    clock(f"killed {victim}, which ran {', '.join(on_victim)}")
    seen: dict[str, float] = {}  # event -> seconds after the kill

    def settled() -> list[Task]:
        down = swarm.node_states()[victim] == "down"
        tasks = swarm.tasks("kill")
        current = {t.slot: t for t in newest(tasks)}
        # event -> what was seen once it has happened, else None
        events: dict[str, str | None] = {f"{victim} marked down": "down" if down else None}
        for slot in survivors:
            t = current[slot]
            events[f"{slot} on {t.node} stopped"] = f"{t.state} {t.error}" if t.state in FINISHED else None
        for slot in servers:  # a server runs again elsewhere, or waits for the only node its label allows
            t = current[slot]
            if t.node not in ("", victim) and t.state == "Running":
                events[f"{slot} rescheduled"] = f"Running on {t.node}"
            else:
                events[f"{slot} rescheduled"] = f"{t.state}: {t.error}" if "no suitable node" in t.error else None
        for event, detail in events.items():
            if detail is not None and event not in seen:
                seen[event] = time.monotonic() - killed_at
                clock(f"{event}: {detail}, {seen[event]:.1f} s after the kill")
        waiting = [event for event, detail in events.items() if detail is None]
        if waiting:
            raise NotYet(", ".join(waiting))
        return tasks

    tasks = wait_until(f"the swarm and the job to settle after killing {victim}", settled, 240, 0.5)
    print(f"\nplacement after the kill:\n{placement(tasks, down=[victim])}\n", flush=True)
    lines = "".join(swarm.logs("kill", service, 400, raw=False) for service in WORKERS).splitlines()
    errors = [line for line in lines if "nanodist worker: error:" in line]
    print("the survivors' last words:\n" + "\n".join(errors), flush=True)

    current = {t.slot: t for t in newest(tasks)}
    assert all(current[slot].state == "Failed" for slot in survivors), placement(tasks, down=[victim])
    assert len(errors) >= len(survivors), "a surviving worker stopped without saying what it lost"
    # A peer whose host vanishes sends no FIN or RST, so a TCP group blocked in a collective can wait for
    # the job's --timeout; the MPI group hears of the loss from the barrier's 5 s lease instead.
    assert max(seen[event] for event in seen if event.endswith(" stopped")) < JOB_TIMEOUT + 30, seen
